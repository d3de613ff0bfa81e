-- embeddings: one row per (item, layer, pooling) for every committed (dataset, model, perturbation)
-- partition. Filters on dataset, model, perturbation and layer (partition columns) skip every
-- other partition's files: the Delta log says which files hold which partition.
CREATE OR REPLACE VIEW embeddings AS
SELECT dataset, model, perturbation, modality, item_id, layer, pooling, embedding
FROM {{ source('embeddings') }};
