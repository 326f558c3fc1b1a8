-- tessera.checkpoint — training checkpoints: everything a run needs to continue exactly where it
-- stopped, in one safetensors file.
--
--   local checkpoint = require 'tessera.checkpoint'
--   checkpoint.save('out/checkpoint.safetensors', { model = model, optimizer = opt, loader = loader,
--     generators = { mask = mask_gen }, epoch = 3, iter = 0, step = 1500, config = cfg, extra = { best = 0.71 } })
--   local bundle = checkpoint.load('out/checkpoint.safetensors')   -- the pieces, as plain values
--   checkpoint.restore(bundle, { model = model, optimizer = opt, loader = loader, generators = { mask = mask_gen } })
--
-- What a file holds (format 'tessera.checkpoint', version 1):
--   tensors   model.<name>                  the model's state_dict()
--             optimizer.state.<i>.<key>     T.optim.flatten_state_dict of the optimizer's state_dict()
--             extra.<n>                     tensors found anywhere inside `extra`
--   metadata  format, format_version, tessera_version
--             sections    JSON list of what the file holds: model, optimizer, loader, extra, config
--             position    JSON {epoch, iter, step, iters} — where training continues (see below)
--             rng         JSON {default = {seed, offset}, generators = {name = {seed, offset}}}, the
--                         64-bit values as decimal strings (JSON numbers stop being exact at 2^53)
--             model_keys  JSON list of the model tensor names (a file missing one is refused)
--             optimizer   JSON {class, param_groups, state_keys = {["<i>"] = {keys...}}}
--             loader      JSON of the table loader:state() returned
--             config      JSON of the run's resolved configuration
--             extra       JSON of `extra`, each tensor replaced by {["$tensor"] = "extra.<n>"}
--             any further string metadata given to save (opts.metadata)
--
-- Position: `epoch` (0-based) and `iter` (iterations of that epoch already done) say where to
-- continue; `step` counts optimizer steps (or iterations) since the start; `iters` is the number
-- of iterations per epoch when the caller knows it. A checkpoint taken at the end of epoch e says
-- {epoch = e + 1, iter = 0}.
--
-- Saving goes through T.save: the file is written to a temporary name, synced and renamed over
-- the final name, so a crash at any moment leaves either the previous checkpoint or the new one
-- under that name, never a torn file. Temporary files that crashed writers left behind (their
-- process is gone) are removed by the next save to the same path.
--
-- Loading is tolerant of what it does not know (extra tensors and metadata keys from newer
-- writers are ignored) and strict about what it needs: a missing section, tensor or metadata key
-- is an error naming it, and so are files that are not tessera checkpoints.
local each = require 'tessera.each'
local T = require 'tessera'
local core = require 'tessera.core'
local json = require 'tessera.json'
local ffi = core.ffi

local checkpoint = {}

checkpoint.FORMAT = 'tessera.checkpoint'
checkpoint.VERSION = 1

local RESERVED = { format = true, format_version = true, tessera_version = true, sections = true, position = true,
  rng = true, model_keys = true, optimizer = true, loader = true, config = true, extra = true }

-- ---- small helpers -------------------------------------------------------------------------------
local function fail(fmt, ...) error(string.format(fmt, ...), 0) end

local bare_message = core.bare_message

local function is_module(x) return type(x) == 'table' and type(x.state_dict) == 'function' end

-- ---- 64-bit generator states -----------------------------------------------------------------------
local function u64_string(x)
  if type(x) == 'number' then return string.format('%.0f', x) end
  return (tostring(ffi.cast('uint64_t', x)):gsub('ULL$', ''))
end

local function u64_parse(s, what)
  if type(s) == 'number' then return s end
  if type(s) ~= 'string' or not s:match('^%d+$') or #s > 20 then
    fail('%s: expected a non-negative decimal integer, got %s', what, tostring(s))
  end
  if #s <= 15 then return tonumber(s) end
  local v = 0ULL
  for i = 1, #s do v = v * 10 + (s:byte(i) - 48) end
  return v
end

local function generator_state(g, what)
  if not T.is_generator(g) then fail('%s: expected a Generator, got %s', what, type(g)) end
  local s = g:get_state()
  return { seed = u64_string(s.seed), offset = u64_string(s.offset) }
end

local function apply_generator_state(g, s, what)
  g:set_state({ seed = u64_parse(s.seed, what .. ' seed'), offset = u64_parse(s.offset, what .. ' offset') })
end

-- ---- stale temporary files ---------------------------------------------------------------------------
-- T.save writes PATH.tmp.<pid> before renaming it; a writer killed mid-save leaves that file behind.
ffi.cdef [[
  typedef struct tessera_checkpoint_glob {
    size_t gl_pathc; char **gl_pathv; size_t gl_offs; int gl_flags; void *reserved[8];
  } tessera_checkpoint_glob;
  int glob(const char *pattern, int flags, void *errfunc, void *pglob);
  void globfree(void *pglob);
  int kill(int pid, int sig);
]]
local ESRCH = 3

local function glob_escape(s) return (s:gsub('[%*%?%[%]\\]', '\\%0')) end

-- Gone: no such process, or a zombie (dead, not yet reaped by its parent).
local function process_is_gone(pid)
  if ffi.C.kill(pid, 0) ~= 0 then return ffi.errno() == ESRCH end
  local f = io.open('/proc/' .. pid .. '/stat', 'rb')
  if not f then return false end
  local stat = f:read('*a')
  f:close()
  local state = stat:match('%) (%a)')
  return state == 'Z' or state == 'X'
end

-- Removes PATH.tmp.<pid> files whose writer process no longer exists.
function checkpoint.remove_stale_temporaries(path)
  local g = ffi.new('tessera_checkpoint_glob')
  if ffi.C.glob(glob_escape(path) .. '.tmp.*', 0, nil, g) ~= 0 then return 0 end
  local removed = 0
  for i = 0, tonumber(g.gl_pathc) - 1 do
    local name = ffi.string(g.gl_pathv[i])
    local pid = tonumber(name:match('%.tmp%.(%d+)$'))
    if pid and pid > 0 and pid ~= 1 and process_is_gone(pid) and os.remove(name) then removed = removed + 1 end
  end
  ffi.C.globfree(g)
  return removed
end

-- ---- extra: JSON values with tensors anywhere inside -------------------------------------------------
local TENSOR_MARK = '$tensor'

local function split_extra(extra, tensors)
  local n = 0
  local function walk(v, where, depth)
    if depth > 64 then fail('checkpoint.save: extra is nested too deeply (a cycle?) at %s', where) end
    if core.is_tensor(v) then
      n = n + 1
      local name = 'extra.' .. n
      tensors[name] = v
      return { [TENSOR_MARK] = name }
    end
    if type(v) ~= 'table' or v == json.null then return v end
    local out = json.is_array(v) and json.array({}) or {}
    for k, x in each(v) do out[k] = walk(x, where .. '.' .. tostring(k), depth + 1) end
    return out
  end
  return walk(extra, 'extra', 0)
end

local function join_extra(extra, tensors, path)
  local function walk(v)
    if type(v) ~= 'table' then return v end
    local name = v[TENSOR_MARK]
    if name ~= nil then
      local t = tensors[name]
      if t == nil then fail('checkpoint: %s is missing tensor %s (referenced by extra)', path, tostring(name)) end
      return t
    end
    for k, x in each(v) do v[k] = walk(x) end
    return v
  end
  return walk(extra)
end

-- ---- saving ----------------------------------------------------------------------------------------
local function position_of(b)
  local what = 'checkpoint.save'
  for _, k in ipairs { 'epoch', 'iter', 'step', 'iters' } do
    if b[k] ~= nil then core.check_integer(what, k, b[k], 0) end
  end
  return { epoch = b.epoch or 0, iter = b.iter or 0, step = b.step, iters = b.iters }
end

local function add_model(b, tensors, meta, sections)
  if b.model == nil then return end
  local sd = is_module(b.model) and b.model:state_dict() or b.model
  if type(sd) ~= 'table' then fail('checkpoint.save: model must be a module or a table of name -> tensor, got %s', type(sd)) end
  local names = json.array({})
  for name, t in each(sd) do
    if not core.is_tensor(t) then fail("checkpoint.save: model entry '%s' is a %s, not a tensor", tostring(name), type(t)) end
    tensors['model.' .. name] = t
    names[#names + 1] = name
  end
  table.sort(names)
  meta.model_keys = names
  sections[#sections + 1] = 'model'
end

local function add_optimizer(b, tensors, meta, sections)
  local opt = b.optimizer
  if opt == nil then return end
  local sd = type(opt.state_dict) == 'function' and opt:state_dict() or opt
  local flat, flat_meta = T.optim.flatten_state_dict(sd)
  local state_keys = {}
  for name, t in each(flat) do
    tensors['optimizer.' .. name] = t
    local index, key = name:match('^state%.(%d+)%.(.+)$')
    state_keys[index] = state_keys[index] or json.array({})
    table.insert(state_keys[index], key)
  end
  for _, keys in each(state_keys) do table.sort(keys) end
  meta.optimizer = { class = type(opt.name) == 'string' and opt.name or nil, param_groups = flat_meta.param_groups,
    state_keys = state_keys }
  sections[#sections + 1] = 'optimizer'
end

-- obj[name] when it is a function; objects may be tables or cdata with methods (T.data's Loader),
-- and indexing a cdata with an unknown key may raise, hence the pcall.
local function method_of(obj, name)
  if type(obj) ~= 'table' and type(obj) ~= 'cdata' then return nil end
  local ok, fn = pcall(function() return obj[name] end)
  return ok and type(fn) == 'function' and fn or nil
end

local function add_loader(b, meta, sections)
  local loader = b.loader
  if loader == nil then return end
  local state = loader
  local state_of = method_of(loader, 'state')
  if state_of then state = state_of(loader) end
  if type(state) ~= 'table' then
    fail('checkpoint.save: loader must have a state() method returning a table (or be that table), got %s', type(state))
  end
  local ok, err = pcall(json.encode, state)
  if not ok then fail('checkpoint.save: the loader state cannot be stored as JSON: %s', bare_message(err)) end
  meta.loader = state
  sections[#sections + 1] = 'loader'
end

local function add_generators(b, meta)
  local rng = { default = generator_state(T.default_generator, 'checkpoint.save: default generator'), generators = {} }
  if b.generators ~= nil then
    if type(b.generators) ~= 'table' then fail('checkpoint.save: generators must be a table of name -> Generator') end
    for name, g in each(b.generators) do
      rng.generators[tostring(name)] = generator_state(g, 'checkpoint.save: generator ' .. tostring(name))
    end
  end
  meta.rng = rng
end

local function add_user_metadata(b, meta)
  if b.metadata == nil then return end
  if type(b.metadata) ~= 'table' then fail('checkpoint.save: metadata must be a table of key -> value') end
  for k, v in each(b.metadata) do
    if RESERVED[k] then fail("checkpoint.save: metadata key '%s' is reserved for the checkpoint format", tostring(k)) end
    meta[k] = v
  end
end

-- checkpoint.save(path, bundle): see the header for the fields of bundle. Returns path.
function checkpoint.save(path, b)
  local what = 'checkpoint.save'
  if type(path) ~= 'string' or path == '' then fail('%s: path must be a non-empty string, got %s', what, tostring(path)) end
  if b == nil then fail('%s: the bundle to save is missing (a table {model =, optimizer =, ...})', what) end
  core.options(what, b, { model = true, optimizer = true, loader = true, generators = true, epoch = true, iter = true,
    step = true, iters = true, config = true, extra = true, metadata = true })
  local tensors, sections = {}, json.array({})
  local meta = { format = checkpoint.FORMAT, format_version = checkpoint.VERSION, tessera_version = core.version,
    position = position_of(b) }
  add_model(b, tensors, meta, sections)
  add_optimizer(b, tensors, meta, sections)
  add_loader(b, meta, sections)
  add_generators(b, meta)
  if b.config ~= nil then meta.config = b.config; sections[#sections + 1] = 'config' end
  if b.extra ~= nil then meta.extra = split_extra(b.extra, tensors); sections[#sections + 1] = 'extra' end
  meta.sections = sections
  add_user_metadata(b, meta)
  checkpoint.remove_stale_temporaries(path)
  local ok, err = pcall(T.save, path, tensors, { metadata = meta })
  if not ok then fail('%s: %s: %s', what, path, bare_message(err)) end
  return path
end

-- ---- loading ---------------------------------------------------------------------------------------
local function decode(meta, key, path, required)
  local text = meta[key]
  if text == nil then
    if required then fail("checkpoint: %s is incomplete: its metadata has no '%s'", path, key) end
    return nil
  end
  local ok, value = pcall(json.decode, text)
  if not ok then fail("checkpoint: %s: metadata '%s' is not valid JSON (%s)", path, key, bare_message(value)) end
  return value
end

local function check_format(meta, path)
  if meta.format ~= checkpoint.FORMAT then
    fail('checkpoint: %s is a safetensors file but not a tessera checkpoint (its metadata has %s); '
      .. 'for plain weights use T.load(path, {into = model})', path,
      meta.format and ("format '" .. meta.format .. "'") or 'no format tag')
  end
  local version = tonumber(meta.format_version)
  if not version then fail('checkpoint: %s has no valid format_version', path) end
  if version > checkpoint.VERSION then
    fail('checkpoint: %s has format version %d; this tessera (%s) reads versions up to %d', path, version,
      core.version, checkpoint.VERSION)
  end
  return version
end

local function take_prefixed(tensors, prefix)
  local out = {}
  for name, t in each(tensors) do
    if name:sub(1, #prefix) == prefix then out[name:sub(#prefix + 1)] = t end
  end
  return out
end

local function load_model(tensors, meta, path)
  local sd = take_prefixed(tensors, 'model.')
  for _, name in ipairs(decode(meta, 'model_keys', path, true)) do
    if sd[name] == nil then fail('checkpoint: %s is missing tensor model.%s', path, name) end
  end
  return sd
end

local function load_optimizer(tensors, meta, path)
  local info = decode(meta, 'optimizer', path, true)
  local flat = take_prefixed(tensors, 'optimizer.')
  for index, keys in each(info.state_keys or {}) do
    for _, key in ipairs(keys) do
      local name = string.format('state.%s.%s', index, key)
      if flat[name] == nil then fail('checkpoint: %s is missing tensor optimizer.%s', path, name) end
    end
  end
  local ok, sd = pcall(T.optim.unflatten_state_dict, flat, { param_groups = info.param_groups })
  if not ok then fail('checkpoint: %s: optimizer state: %s', path, bare_message(sd)) end
  return sd, info.class
end

-- checkpoint.load(path) → a bundle: {model = name → tensor, optimizer = state_dict, optimizer_class,
-- loader = state table, rng = {default, generators}, position, config, extra, metadata (raw strings),
-- format_version, path}. Sections the file lacks are nil.
function checkpoint.load(path)
  if type(path) ~= 'string' or path == '' then fail('checkpoint.load: path must be a non-empty string, got %s', tostring(path)) end
  local ok, tensors, meta = pcall(T.load, path)
  if not ok then fail('checkpoint: cannot load %s: %s', path, bare_message(tensors)) end
  local b = { path = path, metadata = meta, format_version = check_format(meta, path) }
  local sections = {}
  for _, s in ipairs(decode(meta, 'sections', path, true)) do sections[s] = true end
  b.position = decode(meta, 'position', path, true)
  b.rng = decode(meta, 'rng', path, true)
  if type(b.rng.default) ~= 'table' then fail('checkpoint: %s: rng has no default generator state', path) end
  b.rng.generators = b.rng.generators or {}
  if sections.model then b.model = load_model(tensors, meta, path) end
  if sections.optimizer then b.optimizer, b.optimizer_class = load_optimizer(tensors, meta, path) end
  if sections.loader then b.loader = decode(meta, 'loader', path, true) end
  if sections.config then b.config = decode(meta, 'config', path, true) end
  if sections.extra then b.extra = join_extra(decode(meta, 'extra', path, true), tensors, path) end
  return b
end

-- ---- restoring -------------------------------------------------------------------------------------
local function restore_model(b, model, strict)
  if b.model == nil then fail('checkpoint: %s holds no model state', b.path) end
  if not (type(model) == 'table' and type(model.load_state_dict) == 'function') then
    fail('checkpoint.restore: model must be a module (with load_state_dict), got %s', type(model))
  end
  local ok, err = pcall(model.load_state_dict, model, b.model, { strict = strict })
  if not ok then fail('checkpoint: %s does not fit the model: %s', b.path, bare_message(err)) end
end

local function restore_optimizer(b, optimizer)
  if b.optimizer == nil then fail('checkpoint: %s holds no optimizer state', b.path) end
  if type(optimizer) ~= 'table' or type(optimizer.load_state_dict) ~= 'function' then
    fail('checkpoint.restore: optimizer must be an optimizer (with load_state_dict), got %s', type(optimizer))
  end
  if b.optimizer_class and optimizer.name and b.optimizer_class ~= optimizer.name then
    fail('checkpoint: %s holds %s state, but the optimizer is %s', b.path, b.optimizer_class, optimizer.name)
  end
  local ok, err = pcall(optimizer.load_state_dict, optimizer, b.optimizer)
  if not ok then fail('checkpoint: %s does not fit the optimizer: %s', b.path, bare_message(err)) end
end

-- Loaders restore through load_state(t) (set_state(t) and load_state_dict(t) are accepted too).
local function restore_loader(b, loader)
  if b.loader == nil then fail('checkpoint: %s holds no loader state', b.path) end
  local method
  for _, name in ipairs { 'load_state', 'set_state', 'load_state_dict' } do
    if method_of(loader, name) then method = name; break end
  end
  if not method then fail('checkpoint.restore: the loader has no load_state(state) method') end
  local ok, err = pcall(loader[method], loader, b.loader)
  if not ok then fail('checkpoint: %s does not fit the loader: %s', b.path, bare_message(err)) end
end

local function restore_generators(b, generators)
  for name, g in each(generators or {}) do
    local s = b.rng.generators[tostring(name)]
    if s == nil then
      local have = core.sorted_names(b.rng.generators)
      fail("checkpoint: %s has no state for generator '%s' (it has: %s)", b.path, tostring(name),
        #have > 0 and table.concat(have, ', ') or 'none')
    end
    if not T.is_generator(g) then fail("checkpoint.restore: generators.%s is not a Generator", tostring(name)) end
    apply_generator_state(g, s, 'checkpoint: generator ' .. tostring(name))
  end
end

-- checkpoint.restore(bundle_or_path, {model =, optimizer =, loader =, generators = {name = gen},
--   rng = true, strict = true}) → the bundle. Restores what the targets name; rng = false leaves the
-- default generator alone; strict = false lets the model load with missing/unexpected keys.
function checkpoint.restore(b, targets)
  targets = core.options('checkpoint.restore', targets, { model = true, optimizer = true, loader = true, generators = true,
    rng = true, strict = true })
  if type(b) == 'string' then b = checkpoint.load(b) end
  if type(b) ~= 'table' or b.rng == nil then fail('checkpoint.restore: expected a path or a bundle from checkpoint.load') end
  if targets.model ~= nil then restore_model(b, targets.model, targets.strict ~= false) end
  if targets.optimizer ~= nil then restore_optimizer(b, targets.optimizer) end
  if targets.loader ~= nil then restore_loader(b, targets.loader) end
  restore_generators(b, targets.generators)
  if targets.rng ~= false then apply_generator_state(T.default_generator, b.rng.default, 'checkpoint: default generator') end
  return b
end

-- The state of one generator saved in a bundle (nil when absent), for generators made after a
-- restore.
function checkpoint.generator_state(b, name) return b.rng.generators[tostring(name)] end

function checkpoint.apply_generator_state(g, s, what)
  apply_generator_state(g, s, what or 'checkpoint: generator')
end

return checkpoint
