-- Why rows were refused: counts per dataset, modality, stage and reason.
-- Ties are broken by every grouping column, named: DuckDB 2.0 no longer parses `ORDER BY x, ALL`.
SELECT dataset, modality, stage, reason, count(DISTINCT item_id) AS items
FROM quarantine
GROUP BY ALL
ORDER BY items DESC, dataset, modality, stage, reason;
