-- tessera.linalg — matrix products: matmul (NumPy/PyTorch rules, broadcast batches), mm, bmm,
-- mv and dot. Operands are float32 or float64 tensors of one dtype; any strides are accepted.
-- All are differentiable (grad_fn 'matmul' or 'bmm'); an operand broadcast over batch dims gets
-- its gradient summed over them.
local core = require 'tessera.core'
local C, T, Tensor = core.C, core.T, core.Tensor
local wrap, handle = core.wrap, core.handle

-- Fails unless both operands have the given numbers of dims (`expect` describes them).
local function check_dims(what, a, b, na, nb, expect)
  local da, db = C.ts_ndim(handle(a, what)), C.ts_ndim(handle(b, what))
  if da ~= na or db ~= nb then
    error(string.format('%s: expected %s, got shapes [%s] and [%s]', what, expect,
      table.concat(core.shape_of(a.h), ','), table.concat(core.shape_of(b.h), ',')), 0)
  end
end

-- a @ b: 1-D @ 1-D is a dot product (0-d); a 1-D operand is a row (left) or a column (right)
-- whose dim is dropped from the result; leading dims are batch dims and broadcast.
function Tensor.matmul(a, b) return wrap(C.ts_matmul(handle(a, 'matmul'), handle(b, 'matmul'))) end
T.matmul = Tensor.matmul

-- ts_matmul restricted to operands of na and nb dims, as torch.mm, mv and dot are.
local function product_of_dims(what, na, nb, expect)
  return function(a, b)
    check_dims(what, a, b, na, nb, expect)
    return wrap(C.ts_matmul(a.h, b.h))
  end
end

-- [n,k] @ [k,m] only.
Tensor.mm = product_of_dims('mm', 2, 2, '2-D tensors')
T.mm = Tensor.mm

-- [B,n,k] @ [B,k,m], batch sizes equal (no broadcasting).
function Tensor.bmm(a, b) return wrap(C.ts_bmm(handle(a, 'bmm'), handle(b, 'bmm'))) end
T.bmm = Tensor.bmm

-- [n,k] @ [k] → [n].
Tensor.mv = product_of_dims('mv', 2, 1, 'a 2-D matrix and a 1-D vector')
T.mv = Tensor.mv

-- [k] . [k] → 0-d.
Tensor.dot = product_of_dims('dot', 1, 1, '1-D tensors')
T.dot = Tensor.dot

return T
