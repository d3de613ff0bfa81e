-- Nearest neighbours (cosine) of one item among the unperturbed items of the same dataset, model,
-- layer and pooling. Parameters: $dataset, $model, $layer, $pooling, $item_id.
WITH query AS (
    SELECT embedding FROM embeddings
    WHERE dataset = $dataset AND model = $model AND layer = $layer AND pooling = $pooling
      AND perturbation = 'none' AND item_id = $item_id
)
SELECT e.item_id, i.text, i.concept,
       list_cosine_similarity(e.embedding, q.embedding) AS cosine
FROM embeddings e
CROSS JOIN query q
LEFT JOIN items i USING (dataset, item_id, modality, perturbation)
WHERE e.dataset = $dataset AND e.model = $model AND e.layer = $layer AND e.pooling = $pooling
  AND e.perturbation = 'none' AND e.item_id <> $item_id
ORDER BY cosine DESC
LIMIT 10;
