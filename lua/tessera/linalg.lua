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

-- [n,k] @ [k,m] only.
function Tensor.mm(a, b)
  check_dims('mm', a, b, 2, 2, '2-D tensors')
  return wrap(C.ts_matmul(a.h, b.h))
end
T.mm = Tensor.mm

-- [B,n,k] @ [B,k,m], batch sizes equal (no broadcasting).
function Tensor.bmm(a, b) return wrap(C.ts_bmm(handle(a, 'bmm'), handle(b, 'bmm'))) end
T.bmm = Tensor.bmm

-- [n,k] @ [k] → [n].
function Tensor.mv(a, v)
  check_dims('mv', a, v, 2, 1, 'a 2-D matrix and a 1-D vector')
  return wrap(C.ts_matmul(a.h, v.h))
end
T.mv = Tensor.mv

-- [k] . [k] → 0-d.
function Tensor.dot(a, b)
  check_dims('dot', a, b, 1, 1, '1-D tensors')
  return wrap(C.ts_matmul(a.h, b.h))
end
T.dot = Tensor.dot

return T
