-- The k largest |shift| rows of every step (optionally of matching tensors only).
-- param k = 10      rows per step
-- param param = '*' GLOB over tensor names
SELECT step, epoch, example_id, param, flat_index, "row", col, shift, grad
FROM shifts
WHERE param GLOB $param
QUALIFY row_number() OVER (PARTITION BY step ORDER BY abs(shift) DESC, example_id, flat_index)
        <= $k
ORDER BY step, abs(shift) DESC
