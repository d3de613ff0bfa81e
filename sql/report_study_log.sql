-- Studies that did not simply write their scores, from the latest run of each (study,
-- dataset, model pair): skipped (with the reason), failed (with the error) or small_n (scores
-- from fewer items than the study's documented minimum). `metric` is null where the outcome is
-- the whole study's. Empty when every study ran on enough items (or no run logged any).
SELECT dataset, vision_model, language_model, study, metric, status, n, rows, reason, run_id,
       created_at
FROM study_log
WHERE status <> 'written'
ORDER BY dataset, vision_model, language_model, study, metric NULLS FIRST, status;
