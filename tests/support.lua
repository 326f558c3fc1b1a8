-- support.lua — helpers the specs share: references in plain Lua doubles, closeness, errors, files.
local T = require 'tessera'
local S = {}

-- A deterministic pseudo-random list (a small LCG, independent of tessera's RNG).
function S.randoms(n, seed, lo, hi)
  local x, out = seed or 1, {}
  lo, hi = lo or -1, hi or 1
  for i = 1, n do
    x = (x * 1103515245 + 12345) % 2147483648
    out[i] = lo + (hi - lo) * x / 2147483648
  end
  return out
end

-- Nested table of `shape` filled from a flat list in row-major order.
function S.nest(flat, shape)
  local pos = 0
  local function build(d)
    if d > #shape then pos = pos + 1; return flat[pos] end
    local t = {}
    for i = 1, shape[d] do t[i] = build(d + 1) end
    return t
  end
  return build(1)
end

function S.flatten(tbl)
  local out = {}
  local function walk(x)
    if type(x) == 'table' then for _, v in ipairs(x) do walk(v) end else out[#out + 1] = x end
  end
  walk(tbl)
  return out
end

-- A tensor's values as a flat list of Lua numbers (doubles) in row-major order, from any device.
function S.values(t)
  local buf, n = require('tessera.core').host_values(t)
  local out = {}
  for i = 0, n - 1 do out[i + 1] = buf[i] end
  return out
end

-- The number of elements of a shape (a list of sizes).
function S.numel(shape)
  local n = 1
  for _, s in ipairs(shape) do n = n * s end
  return n
end

-- A float64 tensor of random values with the given shape, plus its flat Lua values.
function S.rand_tensor(shape, seed, dtype)
  local flat = S.randoms(S.numel(shape), seed)
  return T.tensor(S.nest(flat, shape), { dtype = dtype or 'float64' }), flat
end

-- ---- files ----------------------------------------------------------------------------------------
function S.read_file(path)
  local f = assert(io.open(path, 'rb'))
  local s = f:read('*a')
  f:close()
  return s
end

-- Writes bytes to path and returns the path.
function S.write_file(path, bytes)
  local f = assert(io.open(path, 'wb'))
  f:write(bytes)
  f:close()
  return path
end

-- A fresh empty directory.
function S.tmpdir()
  local dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir -p '" .. dir .. "'"))
  return dir
end

-- The lines a shell command prints, in order.
function S.lines_of(command)
  local pipe = assert(io.popen(command))
  local lines = {}
  for line in pipe:lines() do lines[#lines + 1] = line end
  pipe:close()
  return lines
end

-- The names in a directory, hidden ones too, sorted.
function S.list_dir(dir)
  local names = S.lines_of("ls -A '" .. dir .. "'")
  table.sort(names)
  return names
end

-- The official implementation's reference files (see ../shared/ref/README.md); none when absent.
S.REF = '../shared/ref/'
function S.ref_files() return S.lines_of('ls ' .. S.REF .. '*.safetensors 2>/dev/null') end

-- Asserts |a - b| <= atol + rtol * |b| elementwise (a: tensor or list/number, b: the reference).
function S.assert_close(actual, expected, rtol, atol, what)
  rtol, atol = rtol or 1e-6, atol or 1e-9
  local a = T.is_tensor(actual) and S.flatten({ actual:totable() }) or S.flatten({ actual })
  local e = T.is_tensor(expected) and S.flatten({ expected:totable() }) or S.flatten({ expected })
  assert(#a == #e, string.format('%s: %d values, expected %d', what or 'assert_close', #a, #e))
  for i = 1, #a do
    local x, y = a[i], e[i]
    if type(x) == 'boolean' or type(y) == 'boolean' then
      assert(x == y, string.format('%s: element %d is %s, expected %s', what or 'assert_close', i, tostring(x), tostring(y)))
    elseif y ~= y then
      assert(x ~= x, string.format('%s: element %d is %s, expected nan', what or 'assert_close', i, tostring(x)))
    elseif y == math.huge or y == -math.huge then
      assert(x == y, string.format('%s: element %d is %s, expected %s', what or 'assert_close', i, tostring(x), tostring(y)))
    else
      assert(math.abs(x - y) <= atol + rtol * math.abs(y),
        string.format('%s: element %d is %.17g, expected %.17g', what or 'assert_close', i, x, y))
    end
  end
end

-- Asserts fn raises an error whose message contains every given plain-text fragment.
function S.assert_error(fn, ...)
  local ok, err = pcall(fn)
  assert(not ok, 'expected an error, but the call succeeded')
  err = tostring(err)
  for _, frag in ipairs { ... } do
    assert(err:find(frag, 1, true), string.format('error message %q does not mention %q', err, frag))
  end
  return err
end

-- A non-contiguous view with the same values as `t`: every other element of a wider tensor.
function S.noncontiguous(t)
  if t:dim() == 0 then return t end
  local shape = t.shape
  shape[#shape] = shape[#shape] * 2
  local v = T.zeros(shape, { dtype = t.dtype }):slice(-1, 0, nil, 2)
  v:copy_(t)
  assert(not v:is_contiguous() or t:numel() <= 1)
  return v
end

-- A float64 leaf that requires grad, with values in [lo, hi) (default [-1, 1)); strided when asked.
function S.grad_leaf(shape, seed, lo, hi, strided)
  local n = 1
  for _, s in ipairs(shape) do n = n * s end
  local t = T.tensor(S.nest(S.randoms(n, seed, lo or -1, hi or 1), shape), { dtype = 'float64' })
  if strided then t = S.noncontiguous(t) end
  return t:requires_grad_()
end

-- Asserts that T.gradcheck passes for fn at inputs; the failure names the case.
function S.gradcheck(name, fn, inputs, opts)
  opts = opts or {}
  opts.name = name
  assert(T.gradcheck(fn, inputs, opts))
end

return S
