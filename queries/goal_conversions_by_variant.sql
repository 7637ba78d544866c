-- Goal conversions by experiment variant: of the subjects exposed to an experiment, how many
-- had at least one goal event (an event type) at or after their first exposure.
-- @param experiment The experiment's flag key.
-- @param goal=lesson_completed The goal's event type.
-- @param days=14 How many days back.
WITH assigned AS (
    SELECT subject,
           first_value(variant ORDER BY event_time) AS variant,
           min(event_time) AS exposed_at
    FROM exposures
    WHERE flag = $experiment AND subject IS NOT NULL
    GROUP BY subject
),
converted AS (
    SELECT DISTINCT e.subject
    FROM events e
    JOIN assigned a ON e.subject = a.subject
    WHERE e.type = $goal
      AND e.event_time >= a.exposed_at
      AND e.event_time >= now() - CAST($days || ' days' AS INTERVAL)
)
SELECT a.variant,
       count(*) AS exposed,
       count(c.subject) AS converted,
       round(CAST(count(c.subject) AS DOUBLE) / count(*), 4) AS conversion_rate
FROM assigned a
LEFT JOIN converted c ON a.subject = c.subject
GROUP BY a.variant
ORDER BY a.variant
