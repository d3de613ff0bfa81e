-- trials: forced-choice trials (Pick-a-Pic, shapes-world foils), one row per trial and direction:
-- `direction` text_to_image (query a caption, choices images) or image_to_text (query an image,
-- choices captions), `kind` (lexical, binding or relation; null for trials of a source that does
-- not say), the human or true labels, and `preferred` (index into choice_item_ids; null for a
-- tie). Join items on query_item_id / list_contains(choice_item_ids, item_id).
CREATE OR REPLACE VIEW trials AS
SELECT dataset, trial_id, direction, kind, query_item_id, choice_item_ids, preferred, label,
       preferred IS NULL AS tie, split, source
FROM {{ source('trials') }};
