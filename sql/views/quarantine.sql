-- quarantine: every refused row with its stage (read | decode | validate | embed) and reason.
-- `model` is null where the source refused the row, and names the model that could not embed it.
CREATE OR REPLACE VIEW quarantine AS
SELECT dataset, item_id, modality, perturbation, stage, reason, source, model, created_at
FROM {{ source('quarantine') }};
