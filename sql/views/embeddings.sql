-- embeddings: one row per (item, layer, pooling) for every committed (dataset, model, perturbation)
-- partition. Filters on dataset, model and perturbation prune whole directories (hive partitions).
CREATE OR REPLACE VIEW embeddings AS
SELECT dataset, model, perturbation, modality, item_id, layer, pooling, embedding
FROM {{ source('embeddings') }};
