-- tessera.recipe — the recipe runner behind `tessera run FILE.lua [--key value ...]`.
--
-- A recipe is a Lua file that returns a table:
--
--   return {
--     name        = 'linreg',                  -- optional; default: the file name without .lua
--     description = 'Linear regression on random data.',
--     defaults    = { seed = 0, epochs = 2, lr = 0.01, batch_size = 16, dims = { 8, 1 }, model = 'linear' },
--     types       = { lr = 'number' },         -- optional: when the default does not say it (see below)
--     choices     = { model = { 'linear', 'mlp' } },          -- optional: the values a key accepts
--     help        = { lr = 'peak learning rate' },             -- optional: one line per option for --help
--     presets     = { quick = { epochs = 1, batch_size = 4 } },-- optional: --preset quick
--     model_keys  = { 'dims', 'model' },       -- optional: keys that define the model; --resume
--                                              -- refuses a checkpoint trained with other values
--     main        = function(cfg, run) ... end,
--   }
--
-- Options. Every key of `defaults` is an option `--key value` (also `--key=value`, and `-` may be
-- written for `_`). Its type comes from the default: an integer-valued number takes integers only,
-- any other number takes numbers, a boolean takes true/false/1/0 (a bare `--flag` means true), a
-- string takes any text, a list takes comma-separated values of its elements' type ('' is the
-- empty list). Lua cannot tell 1.0 from 1, so declare `types = { key = 'number' }` for a
-- real-valued option whose default is a whole number; the types are 'integer', 'number',
-- 'boolean', 'string' and 'integer[]', 'number[]', 'boolean[]', 'string[]' (an empty default list
-- needs one). There is no nil default: use false or '' for "not set". `seed` (integer, default 0)
-- is added when the defaults lack it. Unknown keys are errors listing the valid ones.
--
-- Resolution: defaults, then each `--preset NAME` in order (a table of values from `presets`), then
-- the other command-line values, whatever their order on the line.
--
-- Runner options, known to every recipe (not part of cfg):
--   --output_dir DIR     where everything goes (default ./output/<name>)
--   --resume PATH|auto   continue from a checkpoint; `auto`: output_dir's checkpoint if there is one
--   --overwrite          start afresh in an output_dir that already holds a checkpoint (refused
--                        otherwise, so that a forgotten --resume does not destroy a long run)
--   --preset NAME        apply a preset;  --help  print the description and options
--
-- The runner prints the resolved configuration, writes it to output_dir/config.json, seeds the
-- default generator (T.manual_seed(cfg.seed)) and math.random, and calls main(cfg, run). `run`:
--   run.config, run.output_dir, run.name, run.resume_path (nil on a fresh run)
--   run.clock()                      monotonic seconds (a plain function)
--   run:log(t)                       one JSON object per call appended to output_dir/log.jsonl and
--                                    flushed; one-element tensors become numbers, NaN/inf strings
--   run:progress{epoch=, epochs=, iter=, iters=, loss=, lr=, images_per_s=}
--                                    a progress line with the ETA: in place on a terminal, else one
--                                    line every ~10 s and at the end of each epoch. epoch counts from
--                                    1 (1..epochs) and iter is the iterations done in it (1..iters)
--   run:summary(text)                prints text and appends it to output_dir/summary.txt
--   run:generator(name[, seed])      a Generator of the recipe's own, seeded from cfg.seed and the
--                                    name, saved in checkpoints and restored on resume
--   run:resume(model, optimizer, loader)
--                                    call once, after building them (optimizer and loader may be
--                                    nil). It registers them for checkpoints and, with --resume,
--                                    restores the model, optimizer state, loader state
--                                    (loader:load_state(t)), the default and recipe generators, and
--                                    returns where to continue: {epoch, iter, step, iters, extra,
--                                    config}; nil on a fresh run. A checkpoint whose model_keys
--                                    differ from cfg's is refused before anything is touched.
--   run:save_checkpoint{model=, optimizer=, loader=, epoch=, iter=, step=, iters=, extra=, name=}
--                                    writes output_dir/<name or 'checkpoint'>.safetensors atomically
--                                    (objects default to those given to resume). epoch (0-based) and
--                                    iter (iterations of that epoch done) say where to continue: after
--                                    iteration it (1-based) of epoch e, pass {epoch = e, iter = it};
--                                    at the end of epoch e, {epoch = e + 1, iter = 0}. extra: any
--                                    JSON-able table, tensors allowed inside. Refuses to save
--                                    non-finite model weights or after check_loss failed.
--   run:checkpoint_every(n)          the policy for run:maybe_checkpoint: save every n steps (0: only
--                                    at the end of the run)
--   run:maybe_checkpoint{epoch=, iter=, step=, iters=, extra=}
--                                    call at each iteration boundary: records the position, saves
--                                    when step is a multiple of n; when main returns, the runner
--                                    saves the last recorded position if it was not saved yet
--   run:check_loss(loss, step)       returns loss (a number or one-element tensor) as a number; a NaN
--                                    or infinite loss stops the run with an error naming the step,
--                                    and the last good checkpoint stays as it is
--
-- Determinism: on the CPU a run resumed from a checkpoint computes exactly the losses the
-- uninterrupted run computes, provided every random draw goes through tessera generators (the
-- default one or run:generator) and data order through a loader with state()/load_state(), not
-- math.random (whose state cannot be saved).
--
-- In Lua: require('tessera.recipe').run(recipe_or_path, argv[, {stdout = file}]) → main's results
-- (errors are raised); .cli(...) → an exit status, as `tessera run` uses it.
local each = require 'tessera.each'
local T = require 'tessera'
local core = require 'tessera.core'
local checkpoint = require 'tessera.checkpoint'
local ffi = require 'ffi'
local json = T.json

local R = {}

-- ---- system helpers ------------------------------------------------------------------------------
ffi.cdef [[
  int isatty(int fd);
  int mkdir(const char *path, unsigned int mode);
  int truncate(const char *path, int64_t length);
  char *realpath(const char *path, char *resolved);
  void free(void *p);
]]
local EEXIST = 17

local clock = core.now
R.clock = clock

local function realpath(path)
  local p = ffi.C.realpath(path, nil)
  if p == nil then return nil end
  local s = ffi.string(p)
  ffi.C.free(p)
  return s
end

local function file_exists(path)
  local f = io.open(path, 'rb')
  if f then f:close() end
  return f ~= nil
end

local function file_size(path)
  local f = io.open(path, 'rb')
  if not f then return nil end
  local n = f:seek('end')
  f:close()
  return n
end

-- ---- errors ----------------------------------------------------------------------------------------
-- Errors that say everything the user needs (bad options, a diverged loss): the command prints
-- them without a traceback. `usage` ones exit with status 2.
local RunError = {}
RunError.__index = RunError
RunError.__tostring = function(e) return e.message end

local function is_run_error(e) return getmetatable(e) == RunError end
R.is_error = is_run_error

local function raise(usage, fmt, ...)
  error(setmetatable({ message = string.format(fmt, ...), usage = usage }, RunError), 0)
end
local function usage_error(fmt, ...) raise(true, fmt, ...) end
local function run_error(fmt, ...) raise(false, fmt, ...) end

local strip_position = core.bare_message

local function mkdir_p(dir)
  local prefix = dir:sub(1, 1) == '/' and '/' or ''
  for part in dir:gmatch('[^/]+') do
    prefix = prefix .. part
    if ffi.C.mkdir(prefix, tonumber('777', 8)) ~= 0 and ffi.errno() ~= EEXIST then
      run_error('cannot create the output directory %s (at %s)', dir, prefix)
    end
    prefix = prefix .. '/'
  end
end

-- ---- option types -----------------------------------------------------------------------------------
local SCALAR_TYPES = { integer = true, number = true, boolean = true, string = true }

local function is_finite_integer(v)
  return type(v) == 'number' and v == math.floor(v) and v > -math.huge and v < math.huge
end

local function element_type(t) return t:match('^(%a+)%[%]$') end

local function scalar_type_of(v)
  if type(v) == 'number' then return is_finite_integer(v) and 'integer' or 'number' end
  if type(v) == 'boolean' or type(v) == 'string' then return type(v) end
  return nil
end

-- The type a default implies: lists take the widest element type (integers and numbers → number).
local function infer_type(recipe_name, key, v)
  local t = scalar_type_of(v)
  if t then return t end
  if type(v) ~= 'table' then
    usage_error("recipe %s: default of '%s' must be a number, boolean, string or list, got %s", recipe_name, key, type(v))
  end
  if next(v) == nil then
    usage_error("recipe %s: default of '%s' is an empty list; declare its element type, e.g. types = { %s = 'integer[]' }",
      recipe_name, key, key)
  end
  local elem
  for i = 1, #v do
    local e = scalar_type_of(v[i])
    if e == nil then usage_error("recipe %s: default of '%s' has a %s at [%d]; list elements must be scalars",
      recipe_name, key, type(v[i]), i) end
    if elem == nil or elem == e then elem = e
    elseif (elem == 'integer' and e == 'number') or (elem == 'number' and e == 'integer') then elem = 'number'
    else usage_error("recipe %s: default of '%s' mixes %s and %s elements", recipe_name, key, elem, e) end
  end
  local n = 0
  for _ in each(v) do n = n + 1 end
  if n ~= #v then usage_error("recipe %s: default of '%s' is a table but not a list", recipe_name, key) end
  return elem .. '[]'
end

local function conforms_scalar(t, v)
  if t == 'integer' then return is_finite_integer(v) end
  if t == 'number' then return type(v) == 'number' end
  return type(v) == t
end

local function conforms(t, v)
  local elem = element_type(t)
  if not elem then return conforms_scalar(t, v) end
  if type(v) ~= 'table' then return false end
  for k, x in each(v) do
    if type(k) ~= 'number' or k < 1 or k > #v or not conforms_scalar(elem, x) then return false end
  end
  return true
end

local TYPE_WORDS = { integer = 'an integer', number = 'a number', boolean = 'a boolean (true/false/1/0)',
  string = 'a string' }
local function type_words(t)
  local elem = element_type(t)
  if elem then return 'a comma-separated list of ' .. (elem == 'boolean' and 'booleans' or elem .. 's') end
  return TYPE_WORDS[t]
end

local function parse_scalar(t, text)
  if t == 'string' then return text end
  if t == 'boolean' then
    local s = text:lower()
    if s == 'true' or s == '1' then return true end
    if s == 'false' or s == '0' then return false end
    return nil
  end
  local v = tonumber(text)
  if v == nil or v ~= v then return nil end
  if t == 'integer' and not is_finite_integer(v) then return nil end
  return v
end

-- Text from the command line → a value of type t, or nil and the offending piece.
local function parse_value(t, text)
  local elem = element_type(t)
  if not elem then
    local v = parse_scalar(t, text)
    return v, v == nil and text or nil
  end
  local list = {}
  if text:match('^%s*$') then return list end
  for piece in (text .. ','):gmatch('([^,]*),') do
    local v = parse_scalar(elem, elem == 'string' and piece or piece:match('^%s*(.-)%s*$'))
    if v == nil then return nil, piece end
    list[#list + 1] = v
  end
  return list
end

local function format_value(v)
  if type(v) == 'table' then
    local parts = {}
    for i, x in ipairs(v) do parts[i] = format_value(x) end
    return table.concat(parts, ',')
  end
  if type(v) == 'number' then
    if is_finite_integer(v) and math.abs(v) < 1e15 then return string.format('%d', v) end
    for digits = 15, 17 do -- the shortest text that reads back as the same number
      local text = string.format('%.' .. digits .. 'g', v)
      if tonumber(text) == v then return text end
    end
  end
  return tostring(v)
end

local function copy_value(v)
  if type(v) ~= 'table' then return v end
  local out = {}
  for i, x in ipairs(v) do out[i] = x end
  return out
end

-- ---- recipes ----------------------------------------------------------------------------------------
local RECIPE_FIELDS = { name = true, description = true, defaults = true, types = true, choices = true, help = true,
  presets = true, model_keys = true, main = true }
local RUNNER_OPTIONS = { output_dir = 'DIR', resume = 'PATH|auto', overwrite = '', preset = 'NAME', help = '' }

local function sorted_keys(t)
  local keys = {}
  for k in each(t) do keys[#keys + 1] = k end
  table.sort(keys)
  return keys
end

local function check_fields(recipe, name)
  for k in each(recipe) do
    if not RECIPE_FIELDS[k] then
      usage_error("recipe %s: unknown field '%s' (recipe fields: %s)", name, tostring(k),
        table.concat(sorted_keys(RECIPE_FIELDS), ', '))
    end
  end
  if type(recipe.main) ~= 'function' then usage_error('recipe %s: main must be a function(cfg, run)', name) end
  if type(recipe.defaults) ~= 'table' then usage_error('recipe %s: defaults must be a table of option -> default', name) end
  for _, f in ipairs { 'types', 'choices', 'help', 'presets' } do
    if recipe[f] ~= nil and type(recipe[f]) ~= 'table' then usage_error('recipe %s: %s must be a table', name, f) end
  end
end

local function check_key_table(recipe, name, field)
  for k in each(recipe[field] or {}) do
    if recipe.defaults[k] == nil then
      usage_error("recipe %s: %s names '%s', which is not in defaults", name, field, tostring(k))
    end
  end
end

local function option_types(recipe, name)
  local types = {}
  for key, v in each(recipe.defaults) do
    if type(key) ~= 'string' or not key:match('^[%a_][%w_]*$') then
      usage_error('recipe %s: option names must be identifiers, got %s', name, tostring(key))
    end
    if RUNNER_OPTIONS[key] then usage_error("recipe %s: '%s' is a runner option and cannot be a default", name, key) end
    local t = recipe.types and recipe.types[key] or infer_type(name, key, v)
    if not (SCALAR_TYPES[t] or SCALAR_TYPES[element_type(t) or '']) then
      usage_error("recipe %s: types.%s is '%s'; the types are integer, number, boolean, string and integer[], number[], "
        .. 'boolean[], string[]', name, key, tostring(t))
    end
    if not conforms(t, v) then usage_error("recipe %s: default of '%s' (%s) is not %s", name, key, format_value(v), type_words(t)) end
    types[key] = t
  end
  return types
end

local function check_choices(recipe, name, types)
  for key, list in each(recipe.choices or {}) do
    if element_type(types[key]) then usage_error('recipe %s: choices.%s: only single-valued options take choices', name, key) end
    if type(list) ~= 'table' or #list == 0 then usage_error('recipe %s: choices.%s must be a non-empty list', name, key) end
    local has_default = false
    for _, c in ipairs(list) do
      if not conforms(types[key], c) then usage_error('recipe %s: choices.%s has %s, which is not %s', name, key,
        format_value(c), type_words(types[key])) end
      has_default = has_default or c == recipe.defaults[key]
    end
    if not has_default then
      usage_error("recipe %s: the default of '%s' (%s) is not one of its choices", name, key, format_value(recipe.defaults[key]))
    end
  end
end

local function check_model_keys(recipe, name)
  if recipe.model_keys == nil then return end
  if type(recipe.model_keys) ~= 'table' then usage_error('recipe %s: model_keys must be a list of option names', name) end
  for _, k in ipairs(recipe.model_keys) do
    if recipe.defaults[k] == nil then usage_error("recipe %s: model_keys names '%s', which is not in defaults", name, tostring(k)) end
  end
end

-- The metatable of validated recipes.
local Checked = {}

local function basename(path) return (path:match('([^/]+)$') or path):gsub('%.lua$', '') end

-- Validates a recipe table and returns a normalized description of it.
function R.check(recipe, path)
  local name = type(recipe) == 'table' and recipe.name or (path and basename(path)) or 'recipe'
  if type(recipe) ~= 'table' then usage_error('recipe %s: expected a table, got %s', name, type(recipe)) end
  name = recipe.name or (path and basename(path)) or 'recipe'
  if type(name) ~= 'string' or not name:match('^[%w_.%-]+$') then
    usage_error('recipe %s: name must be letters, digits, _ . or -', tostring(name))
  end
  check_fields(recipe, name)
  local defaults, declared = core.merge(recipe.defaults), core.merge(recipe.types or {})
  if defaults.seed == nil then defaults.seed = 0; declared.seed = declared.seed or 'integer' end
  local r = setmetatable({ name = name, path = path, description = recipe.description or '', defaults = defaults,
    types = declared, choices = recipe.choices or {}, help = recipe.help or {}, presets = recipe.presets or {},
    model_keys = recipe.model_keys or {}, main = recipe.main }, Checked)
  check_key_table(r, name, 'types')
  r.types = option_types(r, name)
  check_key_table(r, name, 'choices')
  check_key_table(r, name, 'help')
  check_choices(r, name, r.types)
  check_model_keys(r, name)
  for preset, values in each(r.presets) do
    if type(values) ~= 'table' then usage_error('recipe %s: presets.%s must be a table of option -> value', name, tostring(preset)) end
  end
  return r
end

-- Loads a recipe file: the table it returns (nil, value when it returns something else).
function R.load(path)
  local chunk, err = loadfile(path)
  if not chunk then usage_error('%s', err) end
  local value = chunk()
  if type(value) ~= 'table' or value.main == nil then return nil, value end
  return R.check(value, path)
end

-- ---- the command line -------------------------------------------------------------------------------
local function edit_distance(a, b)
  local prev = {}
  for j = 0, #b do prev[j] = j end
  for i = 1, #a do
    local cur = { [0] = i }
    for j = 1, #b do
      local cost = a:byte(i) == b:byte(j) and 0 or 1
      cur[j] = math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
    end
    prev = cur
  end
  return prev[#b]
end

local function unknown_option(r, key)
  local best, best_d
  for k in each(r.defaults) do
    local d = edit_distance(key, k)
    if d <= math.max(2, math.floor(#k / 3)) and (not best_d or d < best_d) then best, best_d = k, d end
  end
  local valid = {}
  for _, k in ipairs(sorted_keys(r.defaults)) do valid[#valid + 1] = '--' .. k end
  usage_error('unknown option --%s for recipe %s%s\nvalid options: %s\nrunner options: --output_dir, --resume, '
    .. '--preset, --overwrite, --help', key, r.name, best and (' (did you mean --' .. best .. '?)') or '',
    table.concat(valid, ', '))
end

local function check_choice(r, key, v, where)
  local list = r.choices[key]
  if not list then return end
  for _, c in ipairs(list) do if c == v then return end end
  local shown = {}
  for i, c in ipairs(list) do shown[i] = format_value(c) end
  usage_error('%s: --%s must be one of %s, got %s', where, key, table.concat(shown, ', '), format_value(v))
end

local function typed_from_text(r, key, text, where)
  local t = r.types[key]
  local v, bad = parse_value(t, text)
  if v == nil then
    if element_type(t) and bad ~= text then
      usage_error("%s: --%s expects %s, got '%s' ('%s' is not %s)", where, key, type_words(t), text, bad,
        type_words(element_type(t)))
    end
    usage_error("%s: --%s expects %s, got '%s'", where, key, type_words(t), text)
  end
  return v
end

-- A preset value may be written as the value itself or as command-line text.
local function typed_from_preset(r, key, v, preset)
  local where = 'preset ' .. preset
  if r.defaults[key] == nil then unknown_option(r, key) end
  if type(v) == 'string' and r.types[key] ~= 'string' then return typed_from_text(r, key, v, where) end
  if not conforms(r.types[key], v) then
    usage_error('%s: %s must be %s, got %s', where, key, type_words(r.types[key]), format_value(v))
  end
  return copy_value(v)
end

local function split_argument(arg)
  local key, value = arg:match('^%-%-([^=]+)=(.*)$')
  if not key then key = arg:match('^%-%-(.+)$') end
  if key then key = key:gsub('-', '_') end
  return key, value
end

local function is_boolean_key(r, key) return key == 'overwrite' or key == 'help' or r.types[key] == 'boolean' end

-- argv → {help, presets = {...}, overrides = {{key, text}}, output_dir, resume, overwrite}
local function scan_arguments(r, argv)
  local parsed = { presets = {}, overrides = {} }
  local i = 1
  while i <= #argv do
    local arg = argv[i]
    if arg == '-h' then arg = '--help' end
    local key, value = split_argument(arg)
    if not key then usage_error("unexpected argument '%s' (options are written --key value)", arg) end
    if r.defaults[key] == nil and not RUNNER_OPTIONS[key] then unknown_option(r, key) end
    if value == nil then
      local nxt = argv[i + 1]
      if is_boolean_key(r, key) and (nxt == nil or nxt:sub(1, 2) == '--') then
        value = 'true'
      elseif nxt == nil then
        usage_error('option --%s needs a value', key)
      else
        value, i = nxt, i + 1
      end
    end
    if key == 'preset' then parsed.presets[#parsed.presets + 1] = value
    elseif key == 'help' or key == 'overwrite' then
      local b = parse_scalar('boolean', value)
      if b == nil then usage_error("option --%s expects a boolean (true/false/1/0), got '%s'", key, value) end
      parsed[key] = b
    elseif key == 'output_dir' or key == 'resume' then parsed[key] = value
    else parsed.overrides[#parsed.overrides + 1] = { key, value } end
    i = i + 1
  end
  return parsed
end

local function apply_preset(r, cfg, preset)
  local values = r.presets[preset]
  if values == nil then
    local names = sorted_keys(r.presets)
    usage_error("recipe %s has no preset '%s' (presets: %s)", r.name, preset, #names > 0 and table.concat(names, ', ') or 'none')
  end
  for _, key in ipairs(sorted_keys(values)) do
    local v = typed_from_preset(r, key, values[key], preset)
    check_choice(r, key, v, 'preset ' .. preset)
    cfg[key] = v
  end
end

-- Resolves the configuration: defaults, then presets, then command-line values.
function R.parse(r, argv)
  local parsed = scan_arguments(r, argv or {})
  local cfg = {}
  for k, v in each(r.defaults) do cfg[k] = copy_value(v) end
  for _, p in ipairs(parsed.presets) do apply_preset(r, cfg, p) end
  for _, kv in ipairs(parsed.overrides) do
    local v = typed_from_text(r, kv[1], kv[2], r.name)
    check_choice(r, kv[1], v, r.name)
    cfg[kv[1]] = v
  end
  parsed.config = cfg
  parsed.output_dir = parsed.output_dir or ('output/' .. r.name)
  return parsed
end

-- ---- help ---------------------------------------------------------------------------------------------
local TYPE_METAVARS = { integer = 'INT', number = 'NUM', boolean = 'BOOL', string = 'STR' }
local function metavar(t)
  local elem = element_type(t)
  return elem and (TYPE_METAVARS[elem] .. ',...') or TYPE_METAVARS[t]
end

local function option_lines(rows)
  local width = 0
  for _, row in ipairs(rows) do width = math.max(width, #row[1]) end
  local lines = {}
  for _, row in ipairs(rows) do lines[#lines + 1] = string.format('  %-' .. width .. 's  %s', row[1], row[2]) end
  return table.concat(lines, '\n')
end

function R.help(r, script)
  local rows = {}
  for _, key in ipairs(sorted_keys(r.defaults)) do
    local text = 'default: ' .. (format_value(r.defaults[key]) == '' and "''" or format_value(r.defaults[key]))
    if r.choices[key] then
      local shown = {}
      for i, c in ipairs(r.choices[key]) do shown[i] = format_value(c) end
      text = text .. '; one of ' .. table.concat(shown, ', ')
    end
    if r.help[key] then text = r.help[key] .. ' (' .. text .. ')' end
    rows[#rows + 1] = { '--' .. key .. ' ' .. metavar(r.types[key]), text }
  end
  local out = { string.format('usage: tessera run %s [--key value ...]', script or r.path or (r.name .. '.lua')), '' }
  if r.description ~= '' then out[#out + 1] = r.description; out[#out + 1] = '' end
  out[#out + 1] = 'options:'
  out[#out + 1] = option_lines(rows)
  local presets = sorted_keys(r.presets)
  if #presets > 0 then
    out[#out + 1] = ''
    out[#out + 1] = 'presets (--preset NAME):'
    local prow = {}
    for _, p in ipairs(presets) do
      local parts = {}
      for _, k in ipairs(sorted_keys(r.presets[p])) do parts[#parts + 1] = k .. '=' .. format_value(r.presets[p][k]) end
      prow[#prow + 1] = { p, table.concat(parts, ' ') }
    end
    out[#out + 1] = option_lines(prow)
  end
  out[#out + 1] = ''
  out[#out + 1] = 'runner options:'
  out[#out + 1] = option_lines {
    { '--output_dir DIR', 'where logs and checkpoints go (default: output/' .. r.name .. ')' },
    { '--resume PATH|auto', 'continue from a checkpoint (auto: the output_dir one, if any)' },
    { '--preset NAME', 'apply a preset before the other options' },
    { '--overwrite', 'start afresh even if output_dir holds a checkpoint' },
    { '--help', 'print this help' },
  }
  return table.concat(out, '\n') .. '\n'
end

-- ---- the run object -------------------------------------------------------------------------------------
local Run = {}
Run.__index = Run

local function out_write(run, s)
  if run._inline then run._out:write('\n'); run._inline = false end
  run._out:write(s)
  if run._out.flush then run._out:flush() end
end

-- Logged values: one-element tensors become numbers, non-finite numbers strings (JSON has neither).
local function loggable(v, key)
  if T.is_tensor(v) then
    if v:numel() ~= 1 then
      run_error("run:log: '%s' is a tensor of shape %s; log numbers (t:item()) or small tables", key, tostring(v.shape))
    end
    v = v:item()
  end
  if type(v) == 'number' and (v ~= v or v == math.huge or v == -math.huge) then
    return v ~= v and 'nan' or (v > 0 and 'inf' or '-inf')
  end
  if type(v) == 'table' and v ~= json.null then
    local out = json.is_array(v) and json.array({}) or {}
    for k, x in each(v) do out[k] = loggable(x, key .. '.' .. tostring(k)) end
    return out
  end
  return v
end

function Run:log(entry)
  if type(entry) ~= 'table' then run_error('run:log: expected a table, got %s', type(entry)) end
  local ok, text = pcall(json.encode, loggable(entry, 'entry'))
  if not ok then run_error('run:log: %s', strip_position(text)) end
  self._log:write(text, '\n')
  self._log:flush()
end

local function format_duration(s)
  if s ~= s or s == math.huge then return '?' end
  s = math.floor(s + 0.5)
  local h, m = math.floor(s / 3600), math.floor(s / 60) % 60
  if h > 0 then return string.format('%d:%02d:%02d', h, m, s % 60) end
  return string.format('%d:%02d', m, s % 60)
end

local function progress_line(p, elapsed, eta)
  local parts = {}
  if p.epoch then parts[#parts + 1] = string.format('epoch %d/%s', p.epoch, p.epochs and tostring(p.epochs) or '?') end
  if p.iter then parts[#parts + 1] = string.format('iter %d/%s', p.iter, p.iters and tostring(p.iters) or '?') end
  if p.loss then parts[#parts + 1] = string.format('loss %.4f', p.loss) end
  if p.lr then parts[#parts + 1] = string.format('lr %.3e', p.lr) end
  if p.images_per_s then parts[#parts + 1] = string.format('%.1f img/s', p.images_per_s) end
  parts[#parts + 1] = 'elapsed ' .. format_duration(elapsed)
  if eta then parts[#parts + 1] = 'ETA ' .. format_duration(eta) end
  return table.concat(parts, ' | ')
end

-- Iterations done and in total, when the progress table says enough to know.
local function progress_counts(p)
  if not (p.iter and p.iters) then return nil end
  local done = ((p.epoch or 1) - 1) * p.iters + p.iter
  return done, (p.epochs or p.epoch or 1) * p.iters
end

local PROGRESS_INTERVAL = 10

function Run:progress(p)
  if type(p) ~= 'table' then run_error('run:progress: expected a table, got %s', type(p)) end
  if T.is_tensor(p.loss) then
    local copy = core.merge(p)
    copy.loss, p = p.loss:item(), copy
  end
  local now = clock()
  local done, total = progress_counts(p)
  if done and not self._progress_start then self._progress_start = { time = now, done = done } end
  local eta
  local start = self._progress_start
  if done and start and done > start.done and now > start.time then
    eta = (total - done) * (now - start.time) / (done - start.done)
  end
  local line = progress_line(p, now - self._started, eta)
  local last_of_epoch = p.iter and p.iters and p.iter >= p.iters
  if self._tty then
    self._out:write('\r', line, '\27[K')
    self._out:flush()
    self._inline = true
    if last_of_epoch then self._out:write('\n'); self._inline = false end
  elseif last_of_epoch or not self._last_progress or now - self._last_progress >= PROGRESS_INTERVAL then
    out_write(self, line .. '\n')
    self._last_progress = now
  end
end

function Run:summary(text)
  text = tostring(text)
  out_write(self, text .. '\n')
  local f = io.open(self.output_dir .. '/summary.txt', 'a')
  if f then f:write(text, '\n'); f:close() end
end

-- ---- generators ------------------------------------------------------------------------------------------
-- FNV-1a of the name mixed with the seed: distinct, reproducible streams per name.
local function derived_seed(seed, name)
  local h = 14695981039346656037ULL
  for i = 1, #name do h = bit.bxor(h, name:byte(i)) * 1099511628211ULL end
  return h + ffi.cast('uint64_t', ffi.cast('int64_t', seed)) * 0x9E3779B97F4A7C15ULL
end

function Run:generator(name, seed)
  if type(name) ~= 'string' or name == '' then run_error('run:generator: name must be a non-empty string') end
  if self._generators[name] then return self._generators[name] end
  local g = T.Generator(seed == nil and derived_seed(self.config.seed, name) or seed)
  if self._bundle then
    local s = checkpoint.generator_state(self._bundle, name)
    if s == nil then
      run_error("run:generator: the checkpoint %s has no state for generator '%s'", self.resume_path, name)
    end
    checkpoint.apply_generator_state(g, s, 'run:generator ' .. name)
  end
  self._generators[name] = g
  return g
end

-- ---- checkpoints ------------------------------------------------------------------------------------------
-- The model's state_dict (or the name -> tensor table given) and the name of its first tensor, in
-- name order, holding NaN or Inf.
local function model_state(model)
  local sd = type(model.state_dict) == 'function' and model:state_dict() or model
  for _, name in ipairs(sorted_keys(sd)) do
    local t = sd[name]
    if T.is_tensor(t) and t:is_floating_point() and not t:isfinite():all():item() then
      return sd, name
    end
  end
  return sd
end

function Run:_track(o)
  for _, k in ipairs { 'model', 'optimizer', 'loader' } do
    if o[k] ~= nil then self._tracked[k] = o[k] end
  end
end

function Run:checkpoint_path(name) return self.output_dir .. '/' .. (name or 'checkpoint') .. '.safetensors' end

function Run:save_checkpoint(o)
  o = o or {}
  local valid = { model = true, optimizer = true, loader = true, epoch = true, iter = true, step = true, iters = true,
    extra = true, name = true, generators = true }
  for k in each(o) do if not valid[k] then run_error("run:save_checkpoint: unknown field '%s'", tostring(k)) end end
  if self._failed then
    run_error('run:save_checkpoint: refusing to save after the run diverged (%s); the last good checkpoint stays', self._failed)
  end
  self:_track(o)
  local model = self._tracked.model
  if model == nil then
    run_error('run:save_checkpoint: no model (pass model = ..., or call run:resume(model, optimizer, loader) first)')
  end
  local sd, bad = model_state(model) -- saved as it was checked: one state_dict() per checkpoint
  if bad then
    self._failed = 'non-finite weights in ' .. bad
    run_error("run:save_checkpoint: the model's %s has NaN or infinite values; not saving, the last good checkpoint stays", bad)
  end
  local generators = {}
  for k, g in each(self._generators) do generators[k] = g end
  for k, g in each(o.generators or {}) do generators[k] = g end
  local path = self:checkpoint_path(o.name)
  local ok, err = pcall(checkpoint.save, path, { model = sd, optimizer = self._tracked.optimizer,
    loader = self._tracked.loader, generators = generators, epoch = o.epoch, iter = o.iter, step = o.step,
    iters = o.iters, config = self.config, extra = o.extra,
    metadata = { recipe = self.name, log_bytes = self._log:seek('end') } })
  if not ok then run_error('%s', strip_position(err)) end
  self._saved = { path = path, step = o.step, epoch = o.epoch or 0, iter = o.iter or 0 }
  self._pending = nil
  return path
end

function Run:checkpoint_every(n)
  if not is_finite_integer(n) or n < 0 then run_error('run:checkpoint_every: n must be an integer >= 0, got %s', tostring(n)) end
  self._every = n
end

function Run:maybe_checkpoint(o)
  if type(o) ~= 'table' or not is_finite_integer(o.step) then
    run_error('run:maybe_checkpoint: expected {epoch =, iter =, step =, ...} with an integer step')
  end
  self._pending = o
  if self._every and self._every > 0 and o.step % self._every == 0 then return self:save_checkpoint(o) end
end

function Run:check_loss(loss, step)
  local v = loss
  if T.is_tensor(v) then v = v:item() end
  if type(v) ~= 'number' then run_error('run:check_loss: expected a number or a one-element tensor, got %s', type(loss)) end
  if v ~= v or v == math.huge or v == -math.huge then
    self._failed = string.format('loss %s at iteration %s', tostring(v), tostring(step))
    local kept
    if self._saved then
      kept = string.format('the last good checkpoint is kept: %s (epoch %d, iter %d%s)', self._saved.path,
        self._saved.epoch, self._saved.iter, self._saved.step and (', step ' .. self._saved.step) or '')
    elseif file_exists(self:checkpoint_path()) then
      kept = 'the checkpoint is kept as it was: ' .. self:checkpoint_path()
    else
      kept = 'no checkpoint was saved before it'
    end
    run_error('the loss is %s at iteration %s; the run stops here. %s', tostring(v), tostring(step),
      kept:sub(1, 1):upper() .. kept:sub(2))
  end
  return v
end

-- ---- resuming ---------------------------------------------------------------------------------------------
local function same_value(a, b)
  if type(a) == 'table' and type(b) == 'table' then
    if #a ~= #b then return false end
    for i = 1, #a do if a[i] ~= b[i] then return false end end
    return true
  end
  return a == b
end

local function check_model_config(self, saved, path)
  if #self._recipe.model_keys == 0 then return end
  if type(saved) ~= 'table' then run_error('resume: %s holds no run configuration', path) end
  local problems = {}
  for _, key in ipairs(self._recipe.model_keys) do
    if saved[key] == nil then
      problems[#problems + 1] = string.format('%s (not in the checkpoint)', key)
    elseif not same_value(saved[key], self.config[key]) then
      problems[#problems + 1] = string.format('%s = %s in the checkpoint, %s now', key, format_value(saved[key]),
        format_value(self.config[key]))
    end
  end
  if #problems > 0 then
    run_error('resume: %s was trained with a different model: %s (model-defining keys must match)', path,
      table.concat(problems, '; '))
  end
end

local function report_config_changes(self, saved)
  local changes = {}
  for _, key in ipairs(sorted_keys(self.config)) do
    if saved[key] ~= nil and not same_value(saved[key], self.config[key]) then
      changes[#changes + 1] = string.format('%s %s -> %s', key, format_value(saved[key]), format_value(self.config[key]))
    end
  end
  if #changes > 0 then out_write(self, 'resume: config differs from the checkpoint in ' .. table.concat(changes, ', ') .. '\n') end
end

-- Puts log.jsonl back to what it was when the checkpoint was written, when resuming in the
-- directory that holds it, so that the log of a resumed run equals an uninterrupted one.
local function rewind_log(self, bundle)
  local bytes = tonumber(bundle.metadata.log_bytes)
  local log = self.output_dir .. '/log.jsonl'
  local ckpt_dir = realpath((self.resume_path:match('^(.*)/[^/]*$') or '.'))
  if not bytes or ckpt_dir ~= realpath(self.output_dir) then return end
  local size = file_size(log)
  if size and size > bytes then ffi.C.truncate(log, bytes) end
end

function Run:resume(model, optimizer, loader)
  if type(model) == 'table' and model.model ~= nil and type(model.state_dict) ~= 'function' then
    model, optimizer, loader = model.model, model.optimizer, model.loader
  end
  if self._resume_called then run_error('run:resume: call it once, after building the model, optimizer and loader') end
  self._resume_called = true
  self:_track({ model = model, optimizer = optimizer, loader = loader })
  if not self.resume_path then return nil end
  local bundle = self._bundle
  local generators = {}
  for k, g in each(self._generators) do generators[k] = g end
  local ok, err = pcall(checkpoint.restore, bundle, { model = model, optimizer = optimizer, loader = loader,
    generators = generators })
  if not ok then run_error('resume: %s', strip_position(err)) end
  report_config_changes(self, bundle.config or {})
  self._resumed = true
  local p = bundle.position
  out_write(self, string.format('resumed from %s: epoch %d, iter %d%s\n', self.resume_path, p.epoch, p.iter,
    p.step and (', step ' .. p.step) or ''))
  self._saved = { path = self.resume_path, step = p.step, epoch = p.epoch, iter = p.iter }
  return { epoch = p.epoch, iter = p.iter, step = p.step, iters = p.iters, extra = bundle.extra, config = bundle.config }
end

-- ---- running ----------------------------------------------------------------------------------------------
local function resolve_resume(parsed)
  local resume = parsed.resume
  if resume == 'auto' then
    local own = parsed.output_dir .. '/checkpoint.safetensors'
    return file_exists(own) and own or nil
  end
  if resume == '' then return nil end
  return resume
end

local function print_config(self, r)
  local rows = {}
  for _, key in ipairs(sorted_keys(self.config)) do
    local v = format_value(self.config[key])
    rows[#rows + 1] = { key, v == '' and "''" or v }
  end
  rows[#rows + 1] = { 'output_dir', self.output_dir }
  if self.resume_path then rows[#rows + 1] = { 'resume', self.resume_path } end
  local head = 'recipe ' .. r.name .. (r.description ~= '' and (': ' .. r.description:match('^[^\n]*')) or '')
  out_write(self, head .. '\n' .. option_lines(rows) .. '\n')
end

local function write_config_json(self)
  local f = io.open(self.output_dir .. '/config.json', 'w')
  if not f then run_error('cannot write %s/config.json', self.output_dir) end
  local record = { recipe = self.name, config = self.config, output_dir = self.output_dir, resume = self.resume_path }
  f:write(json.encode(record, { indent = 2 }), '\n')
  f:close()
end

local function new_run(r, parsed, opts)
  local out = opts.stdout or io.stdout
  local self = setmetatable({ name = r.name, config = parsed.config, output_dir = parsed.output_dir:gsub('/+$', ''),
    clock = clock, _recipe = r, _out = out, _tty = out == io.stdout and ffi.C.isatty(1) == 1, _generators = {},
    _tracked = {}, _started = clock() }, Run)
  self.resume_path = resolve_resume(parsed)
  return self
end

local function open_output(self, overwrite)
  mkdir_p(self.output_dir)
  local own = self:checkpoint_path()
  if not self.resume_path and not overwrite and file_exists(own) then
    usage_error('%s already holds a checkpoint; continue it with --resume auto, start afresh with --overwrite, '
      .. 'or choose another --output_dir', self.output_dir)
  end
  if self.resume_path then
    local ok, bundle = pcall(checkpoint.load, self.resume_path)
    if not ok then run_error('resume: %s', strip_position(bundle)) end
    self._bundle = bundle
    check_model_config(self, bundle.config, self.resume_path)
    rewind_log(self, bundle)
  else
    os.remove(self.output_dir .. '/summary.txt')
  end
  local log, err = io.open(self.output_dir .. '/log.jsonl', self.resume_path and 'a' or 'w')
  if not log then run_error('cannot open the log: %s', err) end
  self._log = log
end

local function finish(self)
  if self._pending and not self._failed then self:save_checkpoint(self._pending) end
  if self.resume_path and not self._resumed then
    out_write(self, string.format('warning: recipe %s never called run:resume, so --resume %s restored nothing\n',
      self.name, self.resume_path))
  end
  if self._inline then self._out:write('\n'); self._inline = false end
end

local function close(self)
  if self._inline then self._out:write('\n'); self._inline = false end
  if self._log then self._log:close(); self._log = nil end
end

-- The error handler of a run: errors of the runner pass as they are; others get the stack of
-- where they happened when opts.traceback is set (the command prints it).
local function error_handler(opts)
  return function(e)
    if is_run_error(e) or not opts.traceback then return e end
    local kept = {}
    for line in debug.traceback(tostring(e), 2):gmatch('[^\n]+') do
      if line:find("in function 'xpcall'", 1, true) then break end -- the runner's own frames
      if not line:find('[builtin#', 1, true) and not line:find('tessera/recipe.lua', 1, true) then kept[#kept + 1] = line end
    end
    return table.concat(kept, '\n')
  end
end

-- Runs a recipe (a table or a file) with command-line arguments; returns main's results.
-- opts: stdout (a file to print to), script (the name --help shows), path (names the recipe
-- when it has no name), traceback (errors of main carry their stack).
function R.run(recipe, argv, opts)
  opts = opts or {}
  local r
  if type(recipe) == 'string' then
    local value
    r, value = R.load(recipe)
    if not r then usage_error('%s does not return a recipe (a table with main); it returned %s', recipe, type(value)) end
  elseif getmetatable(recipe) == Checked then
    r = recipe
  else
    r = R.check(recipe, opts.path)
  end
  local parsed = R.parse(r, argv)
  if parsed.help then
    local out = opts.stdout or io.stdout
    out:write(R.help(r, opts.script))
    return nil
  end
  local self = new_run(r, parsed, opts)
  local results = { xpcall(function()
    open_output(self, parsed.overwrite)
    print_config(self, r)
    write_config_json(self)
    T.manual_seed(self.config.seed)
    math.randomseed(self.config.seed)
    local res = { r.main(self.config, self) }
    finish(self)
    return unpack(res, 1, table.maxn(res))
  end, error_handler(opts)) }
  close(self)
  if not results[1] then error(results[2], 0) end
  return unpack(results, 2, table.maxn(results))
end

-- `tessera run`: runs the recipe, prints errors, returns the exit status (0, 1, or 2 for usage).
function R.cli(recipe, argv, script)
  local opts = { script = script, path = script, traceback = true }
  local ok, err = pcall(R.run, recipe, argv, opts)
  if ok then return 0 end
  io.stdout:flush()
  if is_run_error(err) then
    io.stderr:write(string.format('tessera run %s: %s\n', script or '', err.message))
    return err.usage and 2 or 1
  end
  io.stderr:write(string.format('tessera run %s: %s\n', script or '', tostring(err)))
  return 1
end

return R
