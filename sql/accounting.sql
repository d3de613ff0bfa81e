-- Rows in = rows embedded + rows quarantined, per dataset, model, modality and perturbation.
WITH embedded AS (
    SELECT dataset, model, modality, perturbation, count(DISTINCT item_id) AS embedded
    FROM embeddings GROUP BY ALL
),
refused_here AS (
    SELECT dataset, model, modality, perturbation, count(DISTINCT item_id) AS quarantined
    FROM quarantine WHERE model IS NOT NULL GROUP BY ALL
),
refused_by_source AS (
    SELECT dataset, modality, count(DISTINCT item_id) AS refused_by_source
    FROM quarantine WHERE model IS NULL GROUP BY ALL
),
item_counts AS (
    SELECT dataset, modality, perturbation, count(*) AS items FROM items GROUP BY ALL
)
SELECT e.dataset, e.model, e.modality, e.perturbation, c.items, e.embedded,
       coalesce(r.quarantined, 0) AS quarantined,
       c.items = e.embedded + coalesce(r.quarantined, 0) AS balanced,
       coalesce(s.refused_by_source, 0) AS refused_by_source
FROM embedded e
JOIN item_counts c USING (dataset, modality, perturbation)
LEFT JOIN refused_here r USING (dataset, model, modality, perturbation)
LEFT JOIN refused_by_source s USING (dataset, modality)
ORDER BY ALL;
