-- safetensors_spec.lua — T.save / T.load and the C reader/writer: round trips of every dtype and
-- odd layouts, metadata, zero-copy mapping, tensors outliving their file, atomic writes, every
-- kind of corrupt file, and the reference checkpoints in ../shared/ref.
local each = require 'tessera.each'
local T = require 'tessera'
local S = require 'support'
local core = require 'tessera.core'
local ffi, C = core.ffi, core.C
local json = T.json

-- ---- helpers -------------------------------------------------------------------------------------
local dir

local function path_of(name) return dir .. '/' .. name end

local read_file = S.read_file

local write_file = S.write_file


local function u64le(n)
  local bytes = {}
  for i = 1, 8 do
    bytes[i] = string.char(n % 256)
    n = math.floor(n / 256)
  end
  return table.concat(bytes)
end

local function le_u64(s)
  local n = 0
  for i = 8, 1, -1 do n = n * 256 + s:byte(i) end
  return n
end

-- A safetensors file from raw parts; the header is padded with spaces unless told otherwise.
local function raw_file(header, data, header_len)
  return u64le(header_len or #header) .. header .. (data or '')
end

local function padded(header)
  return header .. string.rep(' ', (8 - #header % 8) % 8)
end

-- The header of a file on disk, decoded, and where its data section starts.
local function header_of(path)
  local s = read_file(path)
  local n = le_u64(s:sub(1, 8))
  return json.decode(s:sub(9, 8 + n)), n, #s - 8 - n
end

-- The tensor's elements as bytes, in row-major order.
local function bytes_of(t)
  local c = t:contiguous()
  return ffi.string(c:data_ptr(), c:numel() * c:element_size())
end

local function count_keys(t)
  local n = 0
  for _ in each(t) do n = n + 1 end
  return n
end

local function float_bytes(values)
  return ffi.string(ffi.new('float[?]', #values, values), 4 * #values)
end

local function assert_same(a, b, what)
  assert.are.equal(a.dtype, b.dtype, what)
  assert.are.same(a.shape, b.shape, what)
  assert(bytes_of(a) == bytes_of(b), (what or 'tensor') .. ': bytes differ')
end

setup(function()
  dir = os.tmpname()
  os.remove(dir)
  assert(os.execute('mkdir -p ' .. dir))
end)

teardown(function()
  os.execute('rm -rf ' .. dir)
end)

-- ---- round trips --------------------------------------------------------------------------------
describe('T.save / T.load round trips', function()
  it('keeps every dtype bit for bit', function()
    T.manual_seed(1)
    local tensors = {
      f32 = T.randn(3, 4),
      f64 = T.randn(2, 3, { dtype = 'float64' }),
      f16 = T.randn(5):to('float16'),
      bf16 = T.randn(2, 2, 2):to('bfloat16'),
      i64 = T.tensor({ 2 ^ 40, -3, 0, 2 ^ 53 }, { dtype = 'int64' }),
      i32 = T.tensor({ { -7, 2 ^ 31 - 1 }, { -2 ^ 31, 5 } }, { dtype = 'int32' }),
      u8 = T.arange(0, 256, { dtype = 'uint8' }),
      [''] = T.ones(1), ['name with "quotes", \\ and \u{1F600}'] = T.zeros(2),
      bool = T.tensor({ true, false, false, true, true }),
    }
    tensors.f32[{ 0, 0 }] = 0 / 0
    tensors.f64[{ 1, 2 }] = -math.huge
    local p = path_of('dtypes.safetensors')
    T.save(p, tensors)
    local loaded, meta = T.load(p)
    assert.are.same({}, meta)
    assert.are.equal(10, count_keys(loaded))
    for name, t in each(tensors) do assert_same(loaded[name], t, name) end
    assert.are.equal('bool', loaded.bool.dtype)
  end)

  it('handles 0-d, empty, non-contiguous and views of larger storages', function()
    local big = T.arange(0, 1000, { dtype = 'float32' })
    local tensors = {
      scalar = T.tensor(3.25, { dtype = 'float64' }),
      empty = T.zeros(0, 3),
      empty_i = T.zeros({ 4, 0 }, { dtype = 'int64' }),
      transposed = T.arange(0, 12, { dtype = 'float32' }):view(3, 4):t(),
      strided = S.noncontiguous(T.arange(0, 6, { dtype = 'int32' }):view(2, 3)),
      window = big:narrow(0, 500, 7),
      expanded = T.tensor({ 1, 2, 3 }):expand(2, 3),
    }
    assert.is_false(tensors.transposed:is_contiguous())
    assert.are.equal(500, tensors.window:storage_offset())
    local p = path_of('shapes.safetensors')
    T.save(p, tensors)
    local loaded = T.load(p)
    for name, t in each(tensors) do
      assert_same(loaded[name], t, name)
      -- (ts_is_contiguous calls some empty tensors non-contiguous: a core issue, reported)
      if t:numel() > 0 then assert.is_true(loaded[name]:is_contiguous(), name) end
    end
    assert.are.equal(0, loaded.scalar:dim())
    assert.are.equal(3.25, loaded.scalar:item())
    -- only the view's own 7 elements are written, not its 1000-element storage
    local _, _, data_len = header_of(p)
    assert(data_len < 200, 'data section holds ' .. data_len .. ' bytes')
  end)

  it('saves an empty table and returns empty results', function()
    local p = path_of('nothing.safetensors')
    T.save(p, {})
    local t, m = T.load(p)
    assert.are.same({}, t)
    assert.are.same({}, m)
  end)

  it('lays data out with no gaps, each tensor aligned to its element size, the data 8-byte aligned', function()
    local p = path_of('layout.safetensors')
    T.save(p, { a = T.zeros(3, { dtype = 'uint8' }), b = T.zeros(3), c = T.zeros(1, { dtype = 'float64' }),
      d = T.zeros(3, { dtype = 'float16' }), e = T.zeros(5, { dtype = 'bool' }), f = T.zeros(2, { dtype = 'int64' }) })
    local header, n, data_len = header_of(p)
    assert.are.equal(0, n % 8)
    local size = { U8 = 1, BOOL = 1, F16 = 2, F32 = 4, F64 = 8, I64 = 8 }
    local ranges = {}
    for name, e in each(header) do
      if name ~= '__metadata__' then
        assert.are.equal(0, e.data_offsets[1] % size[e.dtype], name)
        ranges[#ranges + 1] = e.data_offsets
      end
    end
    table.sort(ranges, function(x, y) return x[1] < y[1] end)
    local at = 0
    for _, r in ipairs(ranges) do
      assert.are.equal(at, r[1])
      at = r[2]
    end
    assert.are.equal(data_len, at)
  end)

  it('writes a module state dict in its own order and loads it back into a module', function()
    local nn = T.nn
    T.manual_seed(3)
    local net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    local p = path_of('module.safetensors')
    T.save(p, net, { metadata = { arch = 'mlp' } })
    local f = C.ts_st_open(p)
    assert(f ~= nil)
    local names = {}
    for i = 0, C.ts_st_count(f) - 1 do names[#names + 1] = ffi.string(C.ts_st_name(f, i)) end
    C.ts_st_close(f)
    assert.are.same(net:state_dict_keys(), names)

    local other = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    local report, meta = T.load(p, { into = other })
    assert.are.same({ missing_keys = {}, unexpected_keys = {}, mismatched_keys = {} }, report)
    assert.are.equal('mlp', meta.arch)
    local want = net:state_dict()
    for name, t in each(other:state_dict()) do assert_same(t, want[name], name) end

    local wrong = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4))
    S.assert_error(function() T.load(p, { into = wrong }) end, 'shape mismatches', '0.weight')
    -- a shape mismatch is an error even when not strict, as in PyTorch
    S.assert_error(function() T.load(p, { into = wrong, strict = false }) end, 'shape mismatches', '0.weight')
  end)

  it('moves CUDA tensors to the CPU for saving', function()
    if not T.cuda.is_available() then return pending('no CUDA device') end
    local p = path_of('cuda.safetensors')
    local x = T.randn(4, 5)
    T.save(p, { x = x:cuda() })
    assert_same(T.load(p).x, x, 'x')
  end)
end)

describe('metadata', function()
  it('round trips strings and stores numbers, booleans and tables as text', function()
    local p = path_of('meta.safetensors')
    local md = {
      plain = 'hello', empty = '', [''] = 'empty key', ['\u{e9}t\u{e9}'] = 'summer',
      unicode = 'héllo ✓ 😀', escapes = 'a"b\\c\n\t\1',
      int = 42, float = 0.1, third = 1 / 3, flag = true, off = false,
      config = { depths = { 2, 2, 6 }, norm = { eps = 1e-6, type = 'LayerNorm' } },
    }
    T.save(p, { x = T.ones(2) }, { metadata = md })
    local _, meta = T.load(p)
    assert.are.equal('hello', meta.plain)
    assert.are.equal('', meta.empty)
    assert.are.equal('empty key', meta[''])
    assert.are.equal('summer', meta['\u{e9}t\u{e9}'])
    assert.are.equal(md.unicode, meta.unicode)
    assert.are.equal(md.escapes, meta.escapes)
    assert.are.equal('42', meta.int)
    assert.are.equal('0.1', meta.float)
    assert.are.equal(1 / 3, tonumber(meta.third))
    assert.are.equal('true', meta.flag)
    assert.are.equal('false', meta.off)
    assert.are.same(md.config, json.decode(meta.config))
    assert.are.equal(count_keys(md), count_keys(meta))
  end)

  it('rejects metadata that cannot be strings', function()
    local p = path_of('badmeta.safetensors')
    local x = { x = T.ones(1) }
    S.assert_error(function() T.save(p, x, { metadata = { f = print } }) end, "metadata 'f'", 'function')
    S.assert_error(function() T.save(p, x, { metadata = { t = T.ones(1) } }) end, "metadata 't'", 'tensor')
    S.assert_error(function() T.save(p, x, { metadata = { [1] = 'a' } }) end, 'metadata keys must be strings')
    S.assert_error(function() T.save(p, x, { metadata = { c = { 0 / 0 } } }) end, "metadata 'c'", 'NaN')
    S.assert_error(function() T.save(p, x, { metadata = 'text' }) end, 'metadata must be a table')
    S.assert_error(function() T.save(p, x, { meta = {} }) end, "unknown option 'meta'")
    assert.is_nil(io.open(p))
  end)

  it('is validated by the C writer', function()
    local p = path_of('cmeta.safetensors')
    local names = ffi.new('const char *[1]', { 'x' })
    local ts = ffi.new('ts_tensor *[1]', { core.handle(T.ones(1)) })
    for _, case in ipairs {
      { '{"a": 1}', 'must be a string' },
      { '{"a": "x", "a": "y"}', 'duplicate metadata key' },
      { '["a"]', "expected '{'" },
      { '{"a": "x"} extra', 'after the metadata object' },
      { '{"a": "\\ud800"}', 'surrogate' },
    } do
      assert.are_not.equal(0, C.ts_st_save(p, 1, names, ts, case[1]))
      local msg = ffi.string(C.ts_last_error())
      assert(msg:find(case[2], 1, true), msg)
      assert(msg:find('invalid JSON metadata at byte', 1, true), msg)
    end
    assert.is_nil(io.open(p))
    -- well-formed metadata is stored compactly
    assert.are.equal(0, C.ts_st_save(p, 1, names, ts, ' { "k" : "v\\u00e9" } '))
    local f = C.ts_st_open(p)
    assert.are.equal('{"k":"vé"}', ffi.string(C.ts_st_metadata(f)))
    C.ts_st_close(f)
  end)
end)

-- ---- the mapping ----------------------------------------------------------------------------------
describe('zero-copy loading', function()
  local p
  before_each(function()
    p = path_of('mapped.safetensors')
    T.save(p, { a = T.arange(0, 4096, { dtype = 'float32' }), b = T.arange(0, 100, { dtype = 'int64' }),
      c = T.tensor({ true, false }) })
  end)

  it('points tensors into the file mapping, without counting it as allocated memory', function()
    local header = header_of(p)
    collectgarbage('collect')
    collectgarbage('stop')
    local before = T.memory_stats().live
    local t = T.load(p)
    local after = T.memory_stats().live
    collectgarbage('restart')
    assert.are.equal(before, after)
    assert.is_false(t.a:shares_storage(t.b)) -- one storage per tensor: separate version counters
    local base = ffi.cast('char *', t.a:data_ptr())
    for name, e in each(header) do
      local delta = ffi.cast('char *', t[name]:data_ptr()) - base
      assert.are.equal(e.data_offsets[1] - header.a.data_offsets[1], tonumber(delta), name)
    end
  end)

  it('writes to loaded tensors go to private pages, never to the file', function()
    local original = read_file(p)
    local t = T.load(p)
    t.a:fill_(42)
    t.b:add_(1)
    t.c:fill_(1)
    assert.are.equal(42, t.a[7]:item())
    assert(read_file(p) == original, 'the file changed')
    local again = T.load(p)
    assert.are.equal(7, again.a[7]:item())
    assert.are.equal(5, again.b[5]:item())
  end)

  it('keeps loaded tensors valid after the file is closed', function()
    local f = C.ts_st_open(p)
    assert(f ~= nil)
    local t = core.wrap(C.ts_st_tensor(f, 0))
    local t2 = core.wrap(C.ts_st_tensor(f, 0))
    assert.is_true(t:shares_storage(t2))
    C.ts_st_close(f)
    t2 = nil
    collectgarbage('collect')
    assert.are.equal(4096, t:numel())
    assert.are.equal(4095 * 4096 / 2, t:sum():item())
    local loaded = T.load(p)
    os.remove(p) -- the mapping outlives the directory entry too
    collectgarbage('collect')
    assert.are.equal(99 * 100 / 2, loaded.b:sum():item())
  end)

  it('survives an atomic overwrite of the file it maps', function()
    local t = T.load(p)
    T.save(p, { a = T.zeros(3) })
    assert.are.equal(4095 * 4096 / 2, t.a:sum():item())
    assert.are.same({ 3 }, T.load(p).a.shape)
  end)

  it('copies data that is misaligned for its dtype into an aligned tensor', function()
    local header = padded('{"u":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
      .. '"f":{"dtype":"F32","shape":[2],"data_offsets":[1,9]}}')
    local q = path_of('misaligned.safetensors')
    write_file(q, raw_file(header, '\7' .. float_bytes({ 1.5, -2 })))
    local t = T.load(q)
    assert.are.same({ 1.5, -2 }, t.f:totable())
    assert.are.equal(7, t.u[0]:item())
    assert.are.equal(0, tonumber(ffi.cast('uintptr_t', t.f:data_ptr())) % 4)
  end)

  it('answers bad handles and indices with errors', function()
    local f = C.ts_st_open(p)
    assert(C.ts_st_tensor(f, 3) == nil)
    assert(ffi.string(C.ts_last_error()):find('index 3 out of range', 1, true))
    assert(C.ts_st_name(f, -1) == nil)
    C.ts_st_close(f)
    assert.are.equal(-1, C.ts_st_count(nil))
    C.ts_st_close(nil)
  end)
end)

-- ---- atomic writes --------------------------------------------------------------------------------
describe('atomic saving', function()
  local p, original
  before_each(function()
    p = path_of('keep.safetensors')
    T.save(p, { x = T.ones(3) })
    original = read_file(p)
  end)

  local function assert_untouched()
    assert(read_file(p) == original, 'the existing file changed')
    for _, name in ipairs(S.list_dir(dir)) do assert(not name:find('.tmp.', 1, true), 'temporary file left: ' .. name) end
  end

  it('leaves an existing file intact when a value is not a tensor', function()
    S.assert_error(function() T.save(p, { x = T.zeros(3), y = 5 }) end, "'y' is a number, not a tensor")
    assert_untouched()
  end)

  it('leaves it intact when the C writer refuses its arguments', function()
    local names = ffi.new('const char *[2]', { 'x', 'x' })
    local t = T.zeros(2)
    local ts = ffi.new('ts_tensor *[2]', { core.handle(t), core.handle(t) })
    assert.are.equal(C.TS_ERR_ARG, C.ts_st_save(p, 2, names, ts, nil))
    assert(ffi.string(C.ts_last_error()):find('given twice', 1, true))
    names[1] = '__metadata__'
    assert.are.equal(C.TS_ERR_ARG, C.ts_st_save(p, 2, names, ts, nil))
    assert(ffi.string(C.ts_last_error()):find('reserved', 1, true))
    names[1] = '\255bad'
    assert.are.equal(C.TS_ERR_ARG, C.ts_st_save(p, 2, names, ts, nil))
    assert(ffi.string(C.ts_last_error()):find('not valid UTF-8', 1, true))
    assert_untouched()
  end)

  it('removes the temporary file when the final rename fails', function()
    local target = path_of('a_directory')
    assert(os.execute('mkdir -p ' .. target .. '/inside'))
    S.assert_error(function() T.save(target, { x = T.ones(2) }) end, 'save: ' .. target, 'renaming')
    assert_untouched()
  end)

  it('reports a directory that does not exist', function()
    S.assert_error(function() T.save(dir .. '/missing/x.safetensors', { x = T.ones(2) }) end, 'cannot create',
      'No such file or directory')
    assert_untouched()
  end)

  it('replaces the file when saving succeeds', function()
    T.save(p, { y = T.zeros(2, 2) })
    local t = T.load(p)
    assert.is_nil(t.x)
    assert.are.same({ 2, 2 }, t.y.shape)
    for _, name in ipairs(S.list_dir(dir)) do assert(not name:find('.tmp.', 1, true), name) end
  end)

  it('checks its arguments', function()
    S.assert_error(function() T.save(42, {}) end, 'save: path must be a string')
    S.assert_error(function() T.save(p, T.ones(2)) end, 'expected a table of name')
    S.assert_error(function() T.save(p, { [3] = T.ones(2) }) end, 'tensor names must be strings')
    S.assert_error(function() T.save(p, { ['a\0b'] = T.ones(2) }) end, 'contains a NUL byte')
    S.assert_error(function() T.load(p, { into = 3 }) end, 'into must be a module')
    S.assert_error(function() T.load(p, { strict = 'yes' }) end, 'strict must be a boolean')
    S.assert_error(function() T.load(p, { device = 'cpu' }) end, "unknown option 'device'")
    assert_untouched()
  end)
end)

-- ---- corrupt files -------------------------------------------------------------------------------
describe('corrupt files', function()
  local function load_error(name, contents, ...)
    local p = path_of(name)
    write_file(p, contents)
    return S.assert_error(function() T.load(p) end, 'load: ' .. p, ...)
  end

  local good = padded('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}')
  local data = float_bytes({ 1, 2 })

  it('loads the well-formed base case', function()
    local p = path_of('good.safetensors')
    write_file(p, raw_file(good, data))
    assert.are.same({ 1, 2 }, T.load(p).a:totable())
  end)

  it('reports missing, short and non-regular files', function()
    S.assert_error(function() T.load(path_of('absent.safetensors')) end, 'cannot open', 'No such file')
    load_error('short', '\5\0\0', 'truncated', '3 bytes')
    load_error('empty', '', 'truncated', '0 bytes')
    S.assert_error(function() T.load(dir) end, 'not a regular file')
  end)

  it('reports header lengths beyond the file or absurd', function()
    load_error('truncated_header', raw_file(good, data):sub(1, 30), 'header length ' .. #good, 'beyond the end')
    load_error('absurd', raw_file(good, data, 2 ^ 60), 'header length 1152921504606846976', 'beyond the end')
    load_error('all_ones', string.rep('\255', 8) .. good .. data, 'header length 18446744073709551615')
    load_error('zero_length', raw_file('', data, 0), 'invalid JSON header at byte 0', "expected '{'")
  end)

  it('reports JSON syntax errors with their byte offset', function()
    local cases = {
      { '{"a":{"dtype":"F32",}}', "at byte 20", 'expected a string' },
      { '{"a" {}}', 'at byte 5', "expected ':'" },
      { '{"a":{"dtype":"F32"}', 'at byte 20', 'end of the header' },
      { '{"a":{"dtype":"F3\x01"}}', 'control character 0x01' },
      { '{"a":{"dtype":"F32","shape":[01]}}', 'at byte 30' },
      { '{"a":{"dtype":"\\q"}}', "invalid escape '\\q'" },
      { '{"\xff":{}}', 'invalid UTF-8' },
      { '{"a":{"x":' .. string.rep('[', 70) .. '1' .. string.rep(']', 70) .. '}}', 'nested deeper' },
      { '{} {}', 'after the header object' },
      { '[]', "expected '{'" },
    }
    for i, case in ipairs(cases) do
      load_error('syntax' .. i, raw_file(case[1], ''), 'invalid JSON header', case[2], case[3])
    end
  end)

  it('reports bad dtypes, shapes and fields', function()
    local function entry(e) return raw_file(padded('{"a":' .. e .. '}'), data) end
    load_error('dtype_unknown', entry('{"dtype":"F33","shape":[2],"data_offsets":[0,8]}'), 'unknown dtype "F33"',
      'supported: F32')
    load_error('dtype_i8', entry('{"dtype":"I8","shape":[8],"data_offsets":[0,8]}'), 'unsupported dtype "I8"')
    load_error('dtype_f8', entry('{"dtype":"F8_E4M3","shape":[8],"data_offsets":[0,8]}'), 'unsupported dtype')
    load_error('dtype_number', entry('{"dtype":3,"shape":[2],"data_offsets":[0,8]}'), '"dtype" must be a string')
    load_error('no_shape', entry('{"dtype":"F32","data_offsets":[0,8]}'), 'tensor "a" has no "shape"')
    load_error('twice', entry('{"dtype":"F32","dtype":"F32"}'), 'has field "dtype" twice')
    load_error('negative', entry('{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}'), 'non-negative integer', '-2')
    load_error('fraction', entry('{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}'), 'non-negative integer', '2.0')
    load_error('rank9', entry('{"dtype":"U8","shape":[1,1,1,1,1,1,1,1,1],"data_offsets":[0,1]}'), 'more than 8 dims')
    load_error('offsets3', entry('{"dtype":"F32","shape":[2],"data_offsets":[0,4,8]}'), 'data_offsets')
    load_error('not_object', entry('[1]'), 'tensor "a": expected an object')
    load_error('huge_shape', entry('{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}'),
      'is too large')
    -- unknown fields are checked as JSON and otherwise ignored, as the reference reader does
    local p = path_of('extra_field.safetensors')
    write_file(p, entry('{"dtype":"F32","note":{"x":[1,null]},"shape":[2],"data_offsets":[0,8]}'))
    assert.are.same({ 1, 2 }, T.load(p).a:totable())
  end)

  it('reports offsets that disagree with the shape, run out of range or overlap', function()
    load_error('mismatch', raw_file(padded('{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}'), data),
      'data_offsets [0, 8] hold 8 bytes, but F32 [3] needs 12')
    load_error('backwards', raw_file(padded('{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}'), data),
      'end before they begin')
    load_error('range', raw_file(padded('{"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}'), data),
      'out of range', 'has 8 bytes')
    load_error('overlap', raw_file(padded('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
      .. '"b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}'), data), 'overlap', '"a" [0, 8]', '"b" [4, 8]')
    load_error('duplicate', raw_file(padded('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
      .. '"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'), data), 'duplicate tensor name "a"')
    -- a file cut inside its data
    local p = path_of('whole.safetensors')
    T.save(p, { x = T.ones(100), y = T.ones(10, { dtype = 'float64' }) })
    local s = read_file(p)
    load_error('cut', s:sub(1, #s - 7), 'out of range', 'truncated')
  end)

  it('reports bad metadata and BOOL bytes', function()
    local function meta(m) return raw_file(padded('{"__metadata__":' .. m .. '}'), '') end
    load_error('meta_number', meta('{"k":1}'), 'value of metadata key "k" must be a string')
    load_error('meta_array', meta('[]'), "expected '{'")
    load_error('meta_twice', raw_file(padded('{"__metadata__":{},"__metadata__":{}}'), ''), 'appears twice')
    local p = path_of('bad_bool.safetensors')
    write_file(p, raw_file(padded('{"b":{"dtype":"BOOL","shape":[3],"data_offsets":[0,3]}}'), '\1\0\7'))
    S.assert_error(function() T.load(p) end, 'tensor "b"', 'BOOL element 2 holds byte 7')
  end)
end)

-- ---- the reference checkpoints ----------------------------------------------------------------------
describe('reference files in ../shared/ref', function()
  local REF = S.REF
  -- from ../shared/ref/README.md: tensors, output.loss, model class
  local known = {
    ummae_swin_tiny = { 365, 1.0830875635147095, 'MaskedAutoencoderSwin' },
    ummae_pvt_tiny = { 261, 1.1563550233840942, 'MaskedAutoencoderPVT' },
    mae_vit_tiny_um = { 115, 1.3258442878723145, 'MaskedAutoencoderViT' },
    mae_vit_tiny_rs = { 113, 1.3076021671295166, 'MaskedAutoencoderViT' },
    simmim_swin_tiny = { 315, 0.8139274716377258, 'SimMIMSwin' },
    simmim_pvt_tiny = { 219, 0.8079650402069092, 'SimMIMPVT' },
    cls_swin_tiny = { 314, 4.063199043273926, 'Swin' },
    cls_pvt_tiny = { 219, 4.568004608154297, 'PVT' },
  }


  it('loads every file with the documented tensor counts, losses and metadata', function()
    local files = S.ref_files()
    if #files == 0 then return pending('no reference files in ' .. REF) end
    for _, file in ipairs(files) do
      local stem = file:match('([^/]+)%.safetensors$')
      local tensors, meta = T.load(file)
      local n = count_keys(tensors)
      assert(n > 0, file)
      assert.are.equal(stem, meta.name)
      assert.are.equal('ummae-ref/1', meta.format)
      json.decode(meta.ctor_kwargs)
      local k = known[stem]
      if k then
        assert.are.equal(k[1], n, stem .. ' tensor count')
        assert.are.equal(k[2], tensors['output.loss']:item(), stem .. ' output.loss')
        assert.are.equal(k[3], meta.model_class, stem .. ' model_class')
      end
      assert.are.equal('float32', tensors['output.loss'].dtype)
      assert.are.equal(tonumber(meta.loss_repr), tensors['output.loss']:item())
    end
  end)

  it('holds the documented values of ummae_swin_tiny', function()
    local file = REF .. 'ummae_swin_tiny.safetensors'
    if not io.open(file) then return pending('no ' .. file) end
    local tensors, meta = T.load(file)
    assert.are.equal(1.0830875635147095, tensors['output.loss']:item())
    assert.are.equal('MaskedAutoencoderSwin', meta.model_class)
    assert.are.equal('uint8', tensors['input.mask'].dtype)
    assert.are.same({ 2, 3, 128, 128 }, tensors['input.imgs'].shape)
    -- re-saving gives the same tensors and metadata back
    local p = path_of('resaved.safetensors')
    T.save(p, tensors, { metadata = meta })
    local again, meta2 = T.load(p)
    assert.are.same(meta, meta2)
    for name, t in each(tensors) do assert_same(again[name], t, name) end
  end)
end)
