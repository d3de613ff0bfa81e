-- Concept mean embeddings in one layer of one model (Li et al.): the image side averages a
-- concept's exemplar images, the language side the word-span embeddings of its in-context
-- sentences. Parameters: $model, $layer, $pooling (pooling of the image/caption rows, e.g. mean).
WITH rows AS (
    SELECT i.dataset, e.model, e.layer, i.concept, e.item_id, e.embedding
    FROM embeddings e
    JOIN items i USING (dataset, item_id, modality, perturbation)
    WHERE e.model = $model AND e.layer = $layer AND e.perturbation = 'none'
      AND i.concept IS NOT NULL
      AND ((i.role = 'context' AND e.pooling = 'word_span')
           OR (i.role = 'exemplar' AND e.pooling = $pooling))
),
components AS (
    SELECT dataset, model, layer, concept, k, avg(v) AS v, count(*) AS n
    FROM (SELECT *, unnest(embedding) AS v, generate_subscripts(embedding, 1) AS k FROM rows)
    GROUP BY ALL
)
SELECT dataset, model, layer, concept, max(n) AS exemplars, list(v ORDER BY k) AS mean_embedding
FROM components
GROUP BY ALL
ORDER BY concept;
