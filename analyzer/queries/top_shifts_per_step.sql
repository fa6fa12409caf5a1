-- The k largest |shift| rows of every step (optionally of matching tensors only); ties go to
-- the smaller example_id, then flat_index.
-- param k = 10      rows per step
-- param param = '*' GLOB over tensor names
SELECT step, epoch, example_id, param, flat_index, "row", col, shift, grad
FROM (
    SELECT step, unnest(max_by(struct_pack(epoch, example_id, param, flat_index, "row", col,
                                           shift, grad), (abs(shift), -example_id, -flat_index), $k),
                  recursive := true)
    FROM shifts
    WHERE param GLOB $param
    GROUP BY step
)
ORDER BY step, abs(shift) DESC, example_id, flat_index
