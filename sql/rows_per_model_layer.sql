-- Rows and embedding width per dataset, model, perturbation, layer and pooling.
SELECT dataset, model, perturbation, layer, pooling,
       count(*) AS rows, count(DISTINCT item_id) AS items, min(len(embedding)) AS dim
FROM embeddings
GROUP BY ALL
ORDER BY ALL;
