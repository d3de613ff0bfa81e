-- What each model put in the lake: perturbations, layers, items, rows and embedding widths.
SELECT model, modality, count(DISTINCT perturbation) AS perturbations,
       count(DISTINCT layer) AS layers, count(DISTINCT item_id) AS items,
       count(*) AS rows, min(len(embedding)) AS min_dim, max(len(embedding)) AS max_dim
FROM embeddings
GROUP BY ALL
ORDER BY modality DESC, model;
