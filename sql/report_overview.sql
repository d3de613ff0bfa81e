-- What the alignment table holds, per study and dataset: model pairs, scores, runs, when, and
-- which versions of the embeddings table the scores were computed from (null: not recorded).
SELECT study, dataset,
       count(DISTINCT vision_model || ' x ' || language_model) AS model_pairs,
       count(DISTINCT metric) AS metrics,
       count(*) AS scores,
       string_agg(DISTINCT run_id, ', ' ORDER BY run_id) AS run_ids,
       list(DISTINCT embeddings_version ORDER BY embeddings_version) AS embeddings_versions,
       min(created_at) AS first_created_at,
       max(created_at) AS last_created_at
FROM alignment
GROUP BY ALL
ORDER BY ALL;
