-- How many study outcomes the latest align runs logged (one row, zeros for a lake whose runs
-- predate the study_log table), and how many of them wrote their scores.
SELECT count(*) AS outcomes, count(*) FILTER (WHERE status = 'written') AS written
FROM study_log;
