-- Median session length by app version, from the duration of ended sessions in the last hours.
-- @param hours=24 How many hours back.
SELECT coalesce(CAST(app_version AS VARCHAR), 'unknown') AS app_version,
       count(*) AS sessions,
       median(CAST(properties['duration_ms'] AS BIGINT)) / 1000.0 AS median_session_seconds
FROM events
WHERE type = 'session_ended'
  AND event_time >= now() - CAST($hours || ' hours' AS INTERVAL)
GROUP BY 1
ORDER BY 1
