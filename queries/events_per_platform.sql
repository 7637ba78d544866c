-- Events per platform in the last hour (or the last `hours`), most active first.
-- @param hours=1 How many hours back.
SELECT coalesce(CAST(platform AS VARCHAR), 'unknown') AS platform,
       count(*) AS events,
       count(DISTINCT subject) AS subjects
FROM events
WHERE event_time >= now() - CAST($hours || ' hours' AS INTERVAL)
GROUP BY 1
ORDER BY events DESC, platform
