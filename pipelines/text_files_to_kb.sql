-- Index a directory of Markdown / text files (e.g. your notes or docs).
-- Edit the LOCATION, then:  mkflow run pipelines/text_files_to_kb.sql

CREATE EXTERNAL TABLE IF NOT EXISTS notes_files
STORED AS TEXT_FILES
LOCATION 'docs/'
OPTIONS ('extensions' 'md,txt');

-- Files that could not be read (e.g. not UTF-8) are rows with an `error`; look at them here.
SELECT doc_id, error FROM notes_files WHERE error IS NOT NULL;

CREATE EXTERNAL TABLE IF NOT EXISTS notes (
    doc_id   VARCHAR NOT NULL,
    title    VARCHAR,
    body     VARCHAR,
    modified TIMESTAMP
)
STORED AS KB
LOCATION 'notes';

INSERT INTO notes
SELECT doc_id, title, body, modified, embed(body)
FROM notes_files
WHERE error IS NULL;
