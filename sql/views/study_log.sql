-- study_log: the outcome of the latest run of each study per (dataset, vision model, language
-- model): written, skipped (with the reason), failed (with the error) or small_n (scores
-- written from fewer items than the study's documented minimum). `metric` is null for the
-- study as a whole and names a metric that was skipped or warned about on its own.
CREATE OR REPLACE VIEW study_log AS
SELECT study, dataset, vision_model, language_model, metric, status, reason, n, rows,
       inputs_hash, run_id, created_at
FROM {{ source('study_log') }};
