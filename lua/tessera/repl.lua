-- tessera.repl — the interactive prompt that `tessera` opens when run without a command.
--
-- LuaJIT with `T = require 'tessera'` as a global. A line is an expression or a statement:
--   > x = T.ones(2, 3)                 statements run
--   > x:sum(1)                         expressions print their values (tensors with dtype, device,
--   > =x.shape                         shape and values); `=expr` is the classic spelling; `_` holds
--                                      the first value of the last expression
--   > function f(a)                    an incomplete chunk continues on the next line ('>> ')
--   >>   return a * 2
--   >> end
-- Errors are printed (with the stack of the entered code) and the prompt carries on. Ctrl-C
-- abandons the line being typed or interrupts running code (press it twice to quit code the JIT
-- compiled, which does not look for interrupts); Ctrl-D exits.
--
-- On a terminal, lines are edited with GNU readline (loaded through the FFI: libreadline.so from
-- libreadline-dev, or libreadline.so.8), with Tab completion of globals, fields and methods and
-- the history kept in ~/.tessera_history. Without readline the prompt still works, without
-- editing. When stdin is not a terminal, lines are read plainly with no prompts, so a pipe can
-- drive it (`printf 'x = T.ones(2)\nx + 1\n' | tessera`); the exit status is then 1 if any chunk
-- failed.
local each = require 'tessera.each'
local ffi = require 'ffi'

local M = {}

ffi.cdef [[
  int isatty(int fd);
  typedef struct tessera_repl_pollfd { int fd; short events; short revents; } tessera_repl_pollfd;
  int poll(void *fds, unsigned long nfds, int timeout);
  char *strdup(const char *s);
  void free(void *p);
]]
local EINTR, POLLIN = 4, 1

-- ---- evaluating chunks ---------------------------------------------------------------------------
local function pack(...) return { n = select('#', ...), ... } end

local function is_incomplete(err) return err:find("'<eof>'$") ~= nil end

-- Compiles a chunk as an expression list (a function returning its values) or else as a
-- statement. Returns the function, or nil, the error and whether more input could complete it.
-- Expressions are compiled as the arguments of a call, never as `return f(x)`: a tail call would
-- drop the chunk's frame, and with it the line number of errors raised in f.
function M.compile(source)
  local text = source:match('^%s*=(.*)$')
  local expr = loadstring('local __pack = ...; return __pack(' .. (text or source) .. '\n)', '=stdin')
  if expr then return function() local v = expr(pack); return unpack(v, 1, v.n) end end
  local fn, err
  if text then
    fn, err = loadstring('return ' .. text, '=stdin')
  else
    fn, err = loadstring(source, '=stdin')
  end
  if fn then return fn end
  return nil, err, is_incomplete(err)
end

-- The stack of an error inside the entered code: the REPL's own frames are left out.
local function traceback(err)
  local text = debug.traceback(type(err) == 'string' and err or tostring(err), 2)
  local lines, msg_done = {}, false
  for line in text:gmatch('[^\n]+') do
    if line:find("in function 'xpcall'", 1, true) then break end
    if msg_done then
      if not line:find("[C]: in function 'error'", 1, true) and not line:find('[builtin#', 1, true)
        and not line:find('tessera/repl.lua', 1, true) then
        lines[#lines + 1] = (line:gsub("^(%s*stdin:%d+:) in function 'expr'$", '%1 in main chunk'))
      end
    elseif line == 'stack traceback:' then
      msg_done = true
      lines[#lines + 1] = line
    else
      lines[#lines + 1] = line
    end
  end
  -- a stack of just the entered chunk adds nothing to the message
  if lines[#lines] and lines[#lines]:find('^%s*stdin:%d+: in main chunk') and lines[#lines - 1] == 'stack traceback:' then
    lines[#lines], lines[#lines - 1] = nil, nil
  end
  return table.concat(lines, '\n')
end

-- ---- printing values -----------------------------------------------------------------------------
local MAX_ITEMS, MAX_DEPTH = 24, 2

local function is_identifier(k) return type(k) == 'string' and k:match('^[%a_][%w_]*$') ~= nil end

local show

local function show_table(t, depth, seen)
  local mt = getmetatable(t)
  if mt and mt.__tostring then return tostring(t) end
  if seen[t] or depth > MAX_DEPTH then return tostring(t) end
  seen[t] = true
  local parts, n = {}, #t
  for i = 1, math.min(n, MAX_ITEMS) do parts[#parts + 1] = show(t[i], depth + 1, seen) end
  local keys = {}
  for k in each(t) do
    if not (type(k) == 'number' and k >= 1 and k <= n and k == math.floor(k)) then keys[#keys + 1] = k end
  end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  for _, k in ipairs(keys) do
    if #parts >= MAX_ITEMS then break end
    local name = is_identifier(k) and k or ('[' .. show(k, depth + 1, seen) .. ']')
    parts[#parts + 1] = name .. ' = ' .. show(t[k], depth + 1, seen)
  end
  if n + #keys > #parts then parts[#parts + 1] = '...' end
  seen[t] = nil
  return '{' .. table.concat(parts, ', ') .. '}'
end

function show(v, depth, seen)
  if type(v) == 'string' then return depth == 0 and v or string.format('%q', v) end
  if type(v) == 'table' then return show_table(v, depth, seen) end
  return tostring(v)
end

-- The printed form of a value: tensors and objects by their __tostring, tables by their contents.
function M.format(v) return show(v, 0, {}) end

-- ---- readline ----------------------------------------------------------------------------------------
ffi.cdef [[
  typedef void (*tessera_rl_line_fn)(char *line);
  typedef char *(*tessera_rl_entry_fn)(const char *text, int state);
  typedef char **(*tessera_rl_completion_fn)(const char *text, int start, int end);
  void rl_callback_handler_install(const char *prompt, tessera_rl_line_fn handler);
  void rl_callback_read_char(void);
  void rl_callback_handler_remove(void);
  void rl_callback_sigcleanup(void);
  void rl_free_line_state(void);
  void rl_cleanup_after_signal(void);
  char **rl_completion_matches(const char *text, tessera_rl_entry_fn entry);
  extern int rl_catch_signals;
  extern int rl_attempted_completion_over;
  extern int rl_completion_append_character;
  extern const char *rl_readline_name;
  extern const char *rl_completer_word_break_characters;
  extern tessera_rl_completion_fn rl_attempted_completion_function;
  void using_history(void);
  void add_history(const char *line);
  int read_history(const char *path);
  int append_history(int n, const char *path);
  int history_truncate_file(const char *path, int lines);
]]

local HISTORY_LINES = 2000

local function load_readline()
  for _, name in ipairs { 'readline', 'libreadline.so.8' } do
    local ok, lib = pcall(ffi.load, name)
    if ok and pcall(function() return lib.rl_callback_read_char end) then return lib end
  end
  return nil
end

-- ---- completion ----------------------------------------------------------------------------------------
local KEYWORDS = { 'and', 'break', 'do', 'else', 'elseif', 'end', 'false', 'for', 'function', 'goto', 'if', 'in',
  'local', 'nil', 'not', 'or', 'repeat', 'return', 'then', 'true', 'until', 'while' }

-- Names reachable by indexing v: its own string keys and those of its __index tables.
local function field_names(v, methods_only)
  local names, seen = {}, {}
  local function add(t, depth)
    if type(t) ~= 'table' or depth > 4 then return end
    for k, x in each(t) do
      if is_identifier(k) and not seen[k] and (not methods_only or type(x) == 'function') then
        seen[k] = true
        names[#names + 1] = k
      end
    end
    local mt = getmetatable(t)
    if type(mt) == 'table' and type(mt.__index) == 'table' then add(mt.__index, depth + 1) end
  end
  if type(v) == 'table' then add(v, 0) end
  if type(v) == 'cdata' or type(v) == 'userdata' or type(v) == 'string' then
    local ok, mt = pcall(getmetatable, v)
    if ok and type(mt) == 'table' and type(mt.__index) == 'table' then add(mt.__index, 0) end
    if type(v) == 'cdata' then
      local core = package.loaded['tessera.core']
      if core and core.is_tensor(v) then add(core.Tensor, 0); add(core.properties, 0) end
    end
  end
  return names
end

-- Candidates completing `text` ("T.nn.Lin", "x:su", "pri").
function M.completions(text)
  local path, sep, partial = text:match('^(.-)([%.:])([%w_]*)$')
  local candidates, prefix = {}, ''
  if path and path ~= '' then
    local v = _G
    for name in path:gmatch('[^%.]+') do
      if not is_identifier(name) then return {} end
      local ok, x = pcall(function() return v[name] end)
      if not ok or x == nil then return {} end
      v = x
    end
    candidates, prefix = field_names(v, sep == ':'), path .. sep
  else
    partial = text
    candidates = field_names(_G)
    for _, k in ipairs(KEYWORDS) do candidates[#candidates + 1] = k end
  end
  local out = {}
  for _, c in ipairs(candidates) do
    if c:sub(1, #partial) == partial then out[#out + 1] = prefix .. c end
  end
  table.sort(out)
  return out
end

local function install_completion(rl, keep)
  local matches
  local entry = ffi.cast('tessera_rl_entry_fn', function(text, state)
    if state == 0 then matches = M.completions(ffi.string(text)) end
    local m = matches[state + 1]
    return m and ffi.C.strdup(m) or nil
  end)
  local complete = ffi.cast('tessera_rl_completion_fn', function(text)
    rl.rl_attempted_completion_over = 1 -- no file-name completion after ours
    return rl.rl_completion_matches(text, entry)
  end)
  local breaks = ffi.new('char[?]', 32, ' \t\n"\'><=;|&{(,+-*/%^~#[]')
  keep[#keep + 1], keep[#keep + 2], keep[#keep + 3] = entry, complete, breaks
  rl.rl_completer_word_break_characters = breaks
  rl.rl_attempted_completion_function = complete
end

-- ---- line readers ----------------------------------------------------------------------------------------
local function history_path()
  local home = os.getenv('HOME')
  if not home or home == '' then return nil end
  local path = home .. '/.tessera_history'
  local f = io.open(path, 'a') -- created when absent; failures only mean no history
  if not f then return nil end
  f:close()
  return path
end

-- Reads lines through readline's callback interface, so that a Ctrl-C at the prompt (seen as an
-- interrupted poll) can abandon the line. read(prompt) → line | nil (end of input) | false (Ctrl-C).
local function readline_reader(rl, cli)
  local keep = {}
  local name = ffi.new('char[?]', 8, 'tessera')
  keep[1] = name
  rl.rl_readline_name = name
  rl.rl_catch_signals = 0
  pcall(install_completion, rl, keep)
  local history = history_path()
  rl.using_history()
  if history then pcall(rl.read_history, history) end

  local line, done
  local handler = ffi.cast('tessera_rl_line_fn', function(p)
    line, done = p ~= nil and ffi.string(p) or nil, true
    if p ~= nil then ffi.C.free(p) end
    rl.rl_callback_handler_remove()
  end)
  keep[#keep + 1] = handler
  local pfd = ffi.new('tessera_repl_pollfd', { 0, POLLIN, 0 })

  local function abandon_line()
    rl.rl_free_line_state()
    pcall(rl.rl_callback_sigcleanup)
    rl.rl_cleanup_after_signal()
    rl.rl_callback_handler_remove()
    io.write('\n')
  end

  local function read(prompt)
    line, done = nil, false
    rl.rl_callback_handler_install(prompt, handler)
    while not done do
      local n = ffi.C.poll(pfd, 1, -1)
      if n > 0 then
        rl.rl_callback_read_char()
      elseif n < 0 and ffi.errno() == EINTR and cli and cli.take_sigint() then
        abandon_line()
        return false
      elseif n < 0 and ffi.errno() ~= EINTR then
        rl.rl_callback_handler_remove()
        return nil
      end
    end
    if line and line:find('%S') then
      rl.add_history(line)
      if history then pcall(rl.append_history, 1, history) end
    end
    return line
  end
  jit.off(read)

  local function close()
    if history then pcall(rl.history_truncate_file, history, HISTORY_LINES) end
  end
  return read, close, keep
end

local function plain_reader(show_prompt)
  return function(prompt)
    if show_prompt then io.write(prompt); io.flush() end
    return io.read('*l')
  end, function() end
end

-- ---- the loop ----------------------------------------------------------------------------------------------
local function print_values(values)
  if values.n == 0 then return end
  local parts = {}
  for i = 1, values.n do parts[i] = M.format(values[i]) end
  io.write(table.concat(parts, '\t'), '\n')
  io.flush()
  _G._ = values[1]
end

local function print_error(text)
  io.stdout:flush()
  io.stderr:write(text, '\n')
  io.stderr:flush()
end

local function execute(fn, cli)
  if cli then cli.sigint('run') end
  local results = pack(xpcall(fn, traceback))
  if cli then cli.sigint('prompt') end
  if not results[1] then
    print_error(tostring(results[2]))
    return false
  end
  print_values({ n = results.n - 1, unpack(results, 2, results.n) })
  return true
end

local function banner(version, has_readline)
  io.write(string.format('tessera %s (%s) - T = require \'tessera\' is loaded; =expr prints, Ctrl-D exits%s\n',
    version or '?', jit.version, has_readline and '' or ' (no readline: install libreadline-dev for line editing)'))
end

-- Runs the prompt. opts: {version, cli = the native helpers of the tessera binary (Ctrl-C)}.
-- Returns the exit status.
function M.main(opts)
  opts = opts or {}
  local interactive = ffi.C.isatty(0) == 1
  local cli = interactive and opts.cli or nil
  local ok, T = pcall(require, 'tessera')
  if not ok then
    print_error('tessera: cannot load the tessera package: ' .. tostring(T))
    return 1
  end
  _G.T = T

  local read, close = plain_reader(interactive)
  local rl = interactive and load_readline() or nil
  if rl then read, close = readline_reader(rl, cli) end
  if interactive then banner(opts.version or T.version, rl ~= nil) end
  if cli then cli.sigint('prompt') end

  local failed, buffer = false, nil
  while true do
    local got_line, line = pcall(read, buffer and '>> ' or '> ')
    if not got_line then -- an interrupt that arrived while the REPL itself was running
      buffer, line = nil, false
    end
    if line == nil then
      if buffer then
        local _, err = M.compile(buffer)
        print_error(err)
        failed = true
      end
      if interactive then io.write('\n') end
      break
    end
    if line == false then
      buffer = nil
    elseif buffer or line:find('%S') then
      buffer = buffer and (buffer .. '\n' .. line) or line
      local fn, err, incomplete = M.compile(buffer)
      if fn then
        local ran, outcome = pcall(execute, fn, cli)
        if not ran then print_error(tostring(outcome)) end
        failed = failed or not ran or not outcome
        buffer = nil
      elseif not incomplete then
        print_error(err)
        failed, buffer = true, nil
      end
    end
  end
  close()
  if cli then cli.sigint('default') end
  return (not interactive and failed) and 1 or 0
end

return M
