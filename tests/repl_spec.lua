-- repl_spec.lua — the `tessera` command: the prompt driven through a pipe (and through a pseudo
-- terminal when util-linux's `script` is there, for readline and the history file), the chunk
-- compiler and completion of tessera.repl, and the exit codes of --help, --version and unknown
-- commands.
local TESSERA = require 'fixtures.tessera_bin'
local repl = require 'tessera.repl'

local function tmpname()
  local p = os.tmpname()
  os.remove(p)
  return p
end

-- Runs a shell command; returns its exit status and everything it printed.
local function shell(cmd)
  local p = io.popen('(' .. cmd .. ') 2>&1; echo "exit=$?"')
  local text = p:read('*a')
  p:close()
  return tonumber(text:match('exit=(%d+)%s*$')), (text:gsub('exit=%d+%s*$', ''))
end

-- Feeds `input` to the prompt on stdin; returns the exit status, stdout and stderr.
local function prompt(input)
  local file, out, err = tmpname(), tmpname(), tmpname()
  local f = io.open(file, 'wb')
  f:write(input)
  f:close()
  local status = shell(string.format("'%s' < '%s' > '%s' 2> '%s'", TESSERA, file, out, err))
  local function slurp(p)
    local h = io.open(p, 'rb')
    local s = h:read('*a')
    h:close()
    os.remove(p)
    return s
  end
  os.remove(file)
  return status, slurp(out), slurp(err)
end

local function has(text, frag)
  assert(text:find(frag, 1, true), string.format('%q does not contain %q', text, frag))
end

describe('the tessera prompt', function()
  it('prints expressions, tensors included, and runs statements', function()
    local status, out, err = prompt('x = T.ones(2)\nx + 1\n=x:sum():item()\n"s", nil, 3\n{1, 2, k = {3}}\nprint("hi")\n')
    assert.are.equal(0, status, err)
    assert.are.equal('', err)
    assert.are.equal('[2., 2.]\n[float32 tensor on cpu, shape [2]]\n2\ns\tnil\t3\n{1, 2, k = {3}}\nhi\n', out)
  end)

  it('keeps going after errors, and reports them', function()
    local status, out, err = prompt('error("boom")\nT.zeros(2) + T.ones(3)\nx = = 1\n=1 + 1\n')
    assert.are.equal(1, status)
    assert.are.equal('2\n', out)
    has(err, 'stdin:1: boom')
    has(err, 'add: shapes [2] and [3] cannot be broadcast')
    has(err, "unexpected symbol near '='")
  end)

  it('continues incomplete chunks on the next lines', function()
    local status, out = prompt('function twice(a)\n  return a * 2\nend\ntwice(21)\nt = {\n  5,\n  6 }\n=#t\nT.tensor({\n1, 2})\n')
    assert.are.equal(0, status)
    assert.are.equal('42\n2\n[1., 2.]\n[float32 tensor on cpu, shape [2]]\n', out)
  end)

  it('keeps the last value in _', function()
    local _, out = prompt('=6 * 7\n=_ + 1\n')
    assert.are.equal('42\n43\n', out)
  end)

  it('reports a chunk left incomplete at the end of input', function()
    local status, _, err = prompt('for i = 1, 3 do\n')
    assert.are.equal(1, status)
    has(err, "'end' expected")
  end)

  it('edits lines with readline on a terminal and keeps ~/.tessera_history', function()
    if shell('command -v script') ~= 0 then
      pending('util-linux script is not installed')
      return
    end
    local home = tmpname()
    os.execute("mkdir -p '" .. home .. "'")
    local status, out = shell(string.format(
      [[printf '=40 + 2\nx = 1\n\004' | HOME='%s' script -qfec '%s' /dev/null]], home, TESSERA))
    assert.are.equal(0, status, out)
    has(out, '42')
    local f = io.open(home .. '/.tessera_history', 'rb')
    assert.is_not_nil(f, 'no history file')
    local history = f:read('*a')
    f:close()
    assert.are.equal('=40 + 2\nx = 1\n', history)
    os.execute("rm -rf '" .. home .. "'")
  end)
end)

describe('tessera.repl', function()
  it('compiles expressions, statements and incomplete chunks', function()
    local fn = repl.compile('1 + 1, "a"')
    assert.are.same({ 2, 'a' }, { fn() })
    assert.are.same({ 3 }, { repl.compile('=1 + 2')() })
    assert.are.equal(0, select('#', repl.compile('y_repl_spec = 1')()))
    assert.are.equal(1, y_repl_spec)
    for _, chunk in ipairs { 'function f()', 'x = {', 'if true then', 'T.ones(', '=1 +', '[[long' } do
      local f, err, incomplete = repl.compile(chunk)
      assert.is_nil(f)
      assert.is_true(incomplete, chunk .. ': ' .. tostring(err))
    end
    local f, _, incomplete = repl.compile('x = = 1')
    assert.is_nil(f)
    assert.is_false(incomplete)
  end)

  it('completes globals, fields and methods', function()
    local T = require 'tessera'
    _G.T = T
    _G.repl_spec_tensor = T.ones(2)
    local c = repl.completions('T.nn.Lin')
    assert.is_truthy(c[1] and c[1]:find('^T%.nn%.Linear'))
    local methods = repl.completions('repl_spec_tensor:su')
    local set = {}
    for _, m in ipairs(methods) do set[m] = true end
    assert.is_true(set['repl_spec_tensor:sum'])
    set = {}
    for _, m in ipairs(repl.completions('fun')) do set[m] = true end
    assert.is_true(set['function'])
    assert.are.same({}, repl.completions('no_such_global_xyz.a'))
  end)

  it('formats values as the prompt prints them', function()
    assert.are.equal('text', repl.format('text'))
    assert.are.equal('{"a", {1, 2}, n = 3}', repl.format({ 'a', { 1, 2 }, n = 3 }))
    local cyclic = {}
    cyclic.self = cyclic
    assert.is_truthy(repl.format(cyclic):find('self = table: ', 1, true))
  end)
end)

describe('tessera command', function()
  it('prints help and version, and refuses unknown commands', function()
    local status, out = shell(string.format("'%s' --help", TESSERA))
    assert.are.equal(0, status)
    has(out, 'usage: tessera')
    has(out, 'run FILE.lua')
    status, out = shell(string.format("'%s' --version", TESSERA))
    assert.are.equal(0, status)
    assert.is_truthy(out:match('^tessera %d+%.%d+%.%d+\n$'), out)
    status, out = shell(string.format("'%s' frobnicate", TESSERA))
    assert.are.equal(2, status)
    has(out, "unknown command 'frobnicate'")
    status, out = shell(string.format("'%s' run", TESSERA))
    assert.are.equal(2, status)
    has(out, 'missing file')
    status, out = shell(string.format("'%s' run /nonexistent/file.lua", TESSERA))
    assert.are.equal(1, status)
    has(out, 'cannot open /nonexistent/file.lua')
  end)
end)
