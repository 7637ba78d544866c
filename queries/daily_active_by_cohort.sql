-- Daily active subjects by cohort: for one experiment, the distinct subjects active each day
-- (UTC) by the variant of their first exposure. Subjects never exposed are not counted.
-- @param experiment The experiment's flag key.
-- @param days=6 Whole days before today to include (0: today only).
WITH assigned AS (
    SELECT subject, first_value(variant ORDER BY event_time) AS variant
    FROM exposures
    WHERE flag = $experiment AND subject IS NOT NULL
    GROUP BY subject
)
SELECT date_trunc('day', e.event_time) AS day,
       a.variant,
       count(DISTINCT e.subject) AS active_subjects
FROM events e
JOIN assigned a ON e.subject = a.subject
WHERE e.event_time >= date_trunc('day', now()) - CAST($days || ' days' AS INTERVAL)
GROUP BY 1, 2
ORDER BY 1, 2
