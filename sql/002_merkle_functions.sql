-- PLACEHOLDER on branch `canonical` only: the migration runner requires migrations numbered
-- 1..n without gaps, and 002_merkle_functions.sql is being written on another branch. When
-- merging, take the other branch's version of this file entirely.
SELECT 1;
