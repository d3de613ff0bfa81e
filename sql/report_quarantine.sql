-- What was quarantined, per dataset: one row per (stage, reason) with the rows and distinct
-- items it refused and which models refused them (null: only the source did), beside the
-- dataset's totals. Most rows first within each dataset. The rows themselves:
-- `SELECT * FROM quarantine WHERE dataset = 'D'`.
WITH totals AS (
    SELECT dataset, count(*) AS dataset_rows, count(DISTINCT item_id) AS dataset_items,
           count(DISTINCT (stage, reason)) AS dataset_reasons
    FROM quarantine
    GROUP BY dataset
),
reasons AS (
    SELECT dataset, stage, reason,
           count(*) AS rows,
           count(DISTINCT item_id) AS items,
           string_agg(DISTINCT model, ', ' ORDER BY model) AS models,
           bool_or(model IS NULL) AS by_source
    FROM quarantine
    GROUP BY dataset, stage, reason
)
SELECT r.dataset, r.stage, r.reason, r.rows, r.items, r.models, r.by_source,
       t.dataset_rows, t.dataset_items, t.dataset_reasons
FROM reasons r JOIN totals t USING (dataset)
ORDER BY r.dataset, r.rows DESC, r.stage, r.reason;
