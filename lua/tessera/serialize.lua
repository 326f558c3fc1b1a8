-- tessera.serialize — T.save / T.load on safetensors files (and T.json, the JSON codec).
--
--   T.save('model.safetensors', model)                         -- an nn module: its state_dict()
--   T.save('t.safetensors', { w = w, b = b }, { metadata = { epoch = 3, note = 'warmup' } })
--   local tensors, metadata = T.load('t.safetensors')           -- name → tensor, key → string
--   local report = T.load('model.safetensors', { into = model, strict = true })
--
-- Saving is atomic (a temporary file renamed over the path): when it fails, an existing file is
-- left as it was. Any strides are accepted; CUDA tensors are copied to the CPU first. Metadata
-- values are stored as strings: numbers and booleans as text (numbers exactly), tables as JSON.
--
-- Loading maps the file: the tensors point into it (zero copy) and writing to them changes only
-- this process's copy-on-write pages, never the file. Metadata comes back as the raw strings
-- (decode JSON values with T.json.decode).
local each = require 'tessera.each'
local core = require 'tessera.core'
local json = require 'tessera.json'
local ffi, C, T = core.ffi, core.C, core.T

T.json = json

-- ---- saving --------------------------------------------------------------------------------------
local function metadata_string(key, v)
  local tv = type(v)
  if tv == 'string' then return v end
  if tv == 'boolean' then return tostring(v) end
  if tv == 'number' then
    if v ~= v or v == math.huge or v == -math.huge then return tostring(v) end
    return json.encode(v) -- exact: the shortest text that reads back as the same double
  end
  if tv == 'table' and not core.is_tensor(v) then
    local ok, text = pcall(json.encode, v)
    if not ok then error(string.format("save: metadata '%s': %s", key, text), 0) end
    return text
  end
  error(string.format("save: metadata '%s' must be a string, number, boolean or table, got %s", key,
    core.is_tensor(v) and 'a tensor' or tv), 0)
end

-- The metadata as the JSON text of a string → string object (nil when there is none).
local function metadata_json(metadata)
  if metadata == nil then return nil end
  if type(metadata) ~= 'table' or core.is_tensor(metadata) then
    error('save: metadata must be a table of key → value, got ' .. type(metadata), 0)
  end
  local strings = {}
  for k, v in each(metadata) do
    if type(k) ~= 'string' then
      error(string.format('save: metadata keys must be strings, got %s %s', type(k), tostring(k)), 0)
    end
    strings[k] = metadata_string(k, v)
  end
  local ok, text = pcall(json.encode, strings)
  if not ok then error('save: metadata: ' .. text, 0) end
  return text
end

local function is_module(x)
  return type(x) == 'table' and type(x.state_dict) == 'function'
end

-- name → tensor and the order to write the names in: a module's own order, else sorted.
local function entries_to_save(obj)
  if type(obj) ~= 'table' or core.is_tensor(obj) then
    error('save: expected a table of name → tensor or a module with state_dict(), got '
      .. (core.is_tensor(obj) and 'a tensor' or type(obj)), 0)
  end
  local sd, order = obj, {}
  if is_module(obj) then
    sd = obj:state_dict()
    if type(obj.state_dict_keys) == 'function' then order = obj:state_dict_keys() end
  end
  local listed, rest = {}, {}
  for _, name in ipairs(order) do listed[name] = true end
  for name in each(sd) do
    if type(name) ~= 'string' then
      error(string.format('save: tensor names must be strings, got %s %s', type(name), tostring(name)), 0)
    end
    if name:find('\0', 1, true) then
      error(string.format('save: tensor name %q contains a NUL byte', name), 0)
    end
    if not listed[name] then rest[#rest + 1] = name end
  end
  table.sort(rest)
  local names = {}
  for _, name in ipairs(order) do if sd[name] ~= nil then names[#names + 1] = name end end
  for _, name in ipairs(rest) do names[#names + 1] = name end
  return sd, names
end

-- T.save(path, tensors_or_module[, {metadata = {...}}])
function T.save(path, obj, opts)
  opts = core.options('save', opts, { metadata = true })
  if type(path) ~= 'string' then error('save: path must be a string, got ' .. type(path), 0) end
  local sd, names = entries_to_save(obj)
  local meta = metadata_json(opts.metadata)
  local n = #names
  local c_names = ffi.new('const char *[?]', math.max(n, 1))
  local c_tensors = ffi.new('ts_tensor *[?]', math.max(n, 1))
  -- `keep` anchors the tensors (and CPU copies) whose handles c_tensors holds; nothing allocates
  -- between the loop and the C call, so no collection can run before the call returns.
  local keep = {}
  for i, name in ipairs(names) do
    local t = sd[name]
    if not core.is_tensor(t) then
      error(string.format("save: '%s' is a %s, not a tensor", name, type(t)), 0)
    end
    if t.is_cuda then t = t:cpu() end
    keep[i] = t
    c_names[i - 1] = name
    c_tensors[i - 1] = core.handle(t, 'save')
  end
  core.check(C.ts_st_save(path, n, c_names, c_tensors, meta))
end

-- ---- loading -------------------------------------------------------------------------------------
local function read_all(f)
  local tensors = {}
  for i = 0, C.ts_st_count(f) - 1 do
    local name = C.ts_st_name(f, i)
    if name == nil then core.raise() end
    tensors[ffi.string(name)] = core.wrap(C.ts_st_tensor(f, i))
  end
  local meta = C.ts_st_metadata(f)
  if meta == nil then core.raise() end
  return tensors, json.decode(ffi.string(meta))
end

-- T.load(path) → tensors (name → tensor), metadata (key → string)
-- T.load(path, {into = module, strict = true}) → the module's load_state_dict report, metadata
function T.load(path, opts)
  opts = core.options('load', opts, { into = true, strict = true })
  if type(path) ~= 'string' then error('load: path must be a string, got ' .. type(path), 0) end
  if opts.into ~= nil and not (type(opts.into) == 'table' and type(opts.into.load_state_dict) == 'function') then
    error('load: into must be a module (with load_state_dict), got ' .. type(opts.into), 0)
  end
  if opts.strict ~= nil and type(opts.strict) ~= 'boolean' then
    error('load: strict must be a boolean, got ' .. type(opts.strict), 0)
  end
  local f = C.ts_st_open(path)
  if f == nil then core.raise() end
  f = ffi.gc(f, C.ts_st_close)
  local ok, tensors, metadata = pcall(read_all, f)
  ffi.gc(f, nil)
  C.ts_st_close(f) -- the tensors keep the mapping alive
  if not ok then error(tensors, 0) end
  if opts.into ~= nil then
    return opts.into:load_state_dict(tensors, { strict = opts.strict ~= false }), metadata
  end
  return tensors, metadata
end

return T
