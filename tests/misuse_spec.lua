-- misuse_spec.lua — every public function and tensor method, called with arguments that make no
-- sense (nothing, a string, a table, NaN, a freed tensor in each place, an empty tensor), either
-- returns or raises a Lua error: a misuse may never crash the process.
local each = require 'tessera.each'
local T = require 'tessera'
local core = require 'tessera.core'

-- file writers, process-wide settings and state changes are left out: they are specced where they live
local SKIP = { save = true, load = true, set_memory_limit = true, set_num_threads = true, manual_seed = true,
  autocast = true, empty_cache = true, free = true }

local function functions_of(tbl)
  local names = {}
  for k, v in each(tbl) do if type(v) == 'function' and not SKIP[k] then names[#names + 1] = k end end
  table.sort(names)
  return names
end

local function odd_arguments()
  local freed = T.ones(2)
  freed:free()
  return freed, { {}, { 'x' }, { {} }, { 0 / 0 }, { freed }, { T.ones(2), freed }, { T.ones(2):gt(0), 1, freed },
    { T.ones(0) }, { T.ones(2, 3), T.ones(4) } }
end

-- Calls fn with each argument list; every call must come back (true or false from pcall).
local function call_all(fn, arg_lists, first)
  for _, a in ipairs(arg_lists) do
    local n = table.maxn(a)
    if first ~= nil then
      assert.is_boolean((pcall(fn, first, unpack(a, 1, n))))
    else
      assert.is_boolean((pcall(fn, unpack(a, 1, n))))
    end
  end
end

describe('misuse', function()
  it('of any T function raises a Lua error or returns', function()
    local _, lists = odd_arguments()
    for _, name in ipairs(functions_of(T)) do call_all(T[name], lists) end
  end)

  it('of any tensor method, on a live or a freed tensor, raises a Lua error or returns', function()
    local freed, lists = odd_arguments()
    for _, name in ipairs(functions_of(core.Tensor)) do
      for _, self in ipairs { T.ones(2, 3), T.ones(2, { dtype = 'int64' }), T.ones(2, 2):t(), freed } do
        call_all(core.Tensor[name], lists, self)
      end
    end
  end)

  it('of any T.F, T.nn, T.optim or T.masks function raises a Lua error or returns', function()
    local _, lists = odd_arguments()
    for _, tbl in ipairs { T.F, T.nn, T.optim, T.masks } do
      for _, name in ipairs(functions_of(tbl)) do
        if name ~= 'render' then call_all(tbl[name], lists) end -- render writes a PNG
      end
    end
  end)
end)
