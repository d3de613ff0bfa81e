-- concepts: one row per concept of a concept-level dataset (image folders): the word naming it,
-- every alias a retrieval hit may match (the word first), and optional frequency and polysemy.
CREATE OR REPLACE VIEW concepts AS
SELECT dataset, concept, word, aliases, frequency, polysemy, source
FROM {{ source('concepts') }};
