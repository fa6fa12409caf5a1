-- Univariate token selection (METHODS.md §5): the tokens of the examples behind a neuron's
-- outlier shifts, each (step, example) counted once. Among tokens seen at least m times there,
-- the top r by relative frequency (share among the attributed tokens / share in the corpus of
-- the tokens table), then the top c of those by attributed count.
-- param neuron = ''  'MODULE:INDEX' (output neuron) or 'MODULE:in:INDEX' (input feature)
-- param m = 20       minimum attributed count
-- param r = 200      tokens kept by relative frequency
-- param c = 5        tokens returned, by attributed count
WITH attributed AS (
    SELECT DISTINCT step, example_id
    FROM neuron_rows($neuron)
),
attributed_tokens AS (
    SELECT t.token_id, count(*) AS attributed_count
    FROM attributed a JOIN tokens t USING (example_id)
    GROUP BY t.token_id
),
corpus AS (
    SELECT token_id, any_value(token) AS token, count(*) AS corpus_count
    FROM tokens GROUP BY token_id
),
scored AS (
    SELECT a.token_id, c.token, a.attributed_count, c.corpus_count,
           (a.attributed_count / sum(a.attributed_count) OVER ())
             / (c.corpus_count / (SELECT sum(corpus_count) FROM corpus)) AS relative_frequency
    FROM attributed_tokens a JOIN corpus c USING (token_id)
),
by_frequency AS (
    SELECT * FROM scored
    WHERE attributed_count >= $m
    ORDER BY relative_frequency DESC, token_id
    LIMIT $r
)
SELECT row_number() OVER (ORDER BY attributed_count DESC, relative_frequency DESC, token_id)
         AS rank,
       token_id, token, attributed_count, corpus_count, relative_frequency
FROM by_frequency
ORDER BY rank
LIMIT $c
