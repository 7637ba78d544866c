-- The lesson completion funnel by variant: of the subjects exposed to an experiment, how many
-- started a lesson and how many completed one in the last hours.
-- @param experiment The experiment's flag key.
-- @param hours=24 How many hours back.
WITH assigned AS (
    SELECT subject, first_value(variant ORDER BY event_time) AS variant
    FROM exposures
    WHERE flag = $experiment AND subject IS NOT NULL
    GROUP BY subject
),
steps AS (
    SELECT subject,
           max(CASE WHEN type = 'lesson_started' THEN 1 ELSE 0 END) AS started,
           max(CASE WHEN type = 'lesson_completed' THEN 1 ELSE 0 END) AS completed
    FROM events
    WHERE event_time >= now() - CAST($hours || ' hours' AS INTERVAL)
      AND type IN ('lesson_started', 'lesson_completed')
    GROUP BY subject
)
SELECT a.variant,
       count(*) AS exposed,
       sum(coalesce(s.started, 0)) AS started_lesson,
       sum(coalesce(s.completed, 0)) AS completed_lesson,
       round(CAST(sum(coalesce(s.completed, 0)) AS DOUBLE) / count(*), 4) AS completion_rate
FROM assigned a
LEFT JOIN steps s ON a.subject = s.subject
GROUP BY a.variant
ORDER BY a.variant
