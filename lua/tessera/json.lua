-- tessera.json — strict JSON (RFC 8259) in plain Lua: safetensors metadata, model configs.
-- Exposed as T.json; it needs nothing else from tessera.
--
--   json.decode(text)            → a Lua value; raises 'json.decode: <problem> at byte P (line L, column C)'
--   json.encode(value[, {indent = 2}])   → text; keys of objects sorted, so output is deterministic
--   json.null                    the value of JSON null (nil cannot sit in a table)
--   json.array(t)                marks t as an array, so that an empty t encodes as [] and not {}
--   json.is_array(t)             true for marked tables (every decoded array is marked)
--
-- Mapping: objects ↔ tables with string keys; arrays ↔ tables with keys 1..n; numbers are Lua
-- numbers (doubles: integers beyond 2^53 lose precision); strings are UTF-8 (the decoder turns
-- every escape, \uXXXX surrogate pairs included, into UTF-8 and rejects malformed UTF-8).
local each = require 'tessera.each'
local json = {}

local byte, sub, find, format, concat = string.byte, string.sub, string.find, string.format, table.concat
local floor, huge = math.floor, math.huge

json.null = setmetatable({}, {
  __tostring = function() return 'json.null' end,
  __newindex = function() error('json.null is read-only', 2) end,
})

local array_marks = setmetatable({}, { __mode = 'k' })

function json.array(t)
  t = t or {}
  if type(t) ~= 'table' then error('json.array: expected a table, got ' .. type(t), 2) end
  array_marks[t] = true
  return t
end

function json.is_array(t) return array_marks[t] == true end

-- ---- UTF-8 ---------------------------------------------------------------------------------------
-- Length of the well-formed UTF-8 sequence at s[i] (RFC 3629: no overlongs, no surrogates, at
-- most U+10FFFF), or nil.
local function utf8_length(s, i)
  local c = byte(s, i)
  if c < 0x80 then return 1 end
  local len, lo, hi = nil, 0x80, 0xBF
  if c >= 0xC2 and c <= 0xDF then len = 2
  elseif c >= 0xE0 and c <= 0xEF then
    len = 3
    if c == 0xE0 then lo = 0xA0 elseif c == 0xED then hi = 0x9F end
  elseif c >= 0xF0 and c <= 0xF4 then
    len = 4
    if c == 0xF0 then lo = 0x90 elseif c == 0xF4 then hi = 0x8F end
  else
    return nil
  end
  local c1 = byte(s, i + 1)
  if not c1 or c1 < lo or c1 > hi then return nil end
  for k = 2, len - 1 do
    local ck = byte(s, i + k)
    if not ck or ck < 0x80 or ck > 0xBF then return nil end
  end
  return len
end

-- Position of the first malformed UTF-8 sequence in s, or nil.
local function invalid_utf8_at(s)
  local i = find(s, '[\128-\255]')
  while i do
    local len = utf8_length(s, i)
    if not len then return i end
    i = find(s, '[\128-\255]', i + len)
  end
  return nil
end

local function utf8_char(cp)
  if cp < 0x80 then return string.char(cp) end
  if cp < 0x800 then return string.char(0xC0 + floor(cp / 0x40), 0x80 + cp % 0x40) end
  if cp < 0x10000 then
    return string.char(0xE0 + floor(cp / 0x1000), 0x80 + floor(cp / 0x40) % 0x40, 0x80 + cp % 0x40)
  end
  return string.char(0xF0 + floor(cp / 0x40000), 0x80 + floor(cp / 0x1000) % 0x40,
    0x80 + floor(cp / 0x40) % 0x40, 0x80 + cp % 0x40)
end

-- ---- decoding ------------------------------------------------------------------------------------
local MAX_DEPTH = 512  -- nesting bound: deeper input is an error, not a stack overflow
local simple_escapes = { [34] = '"', [92] = '\\', [47] = '/', [98] = '\b', [102] = '\f', [110] = '\n',
  [114] = '\r', [116] = '\t' }

local function decode_error(text, pos, msg)
  local line, line_start = 1, 1
  for nl in text:sub(1, pos - 1):gmatch('()\n') do
    line, line_start = line + 1, nl + 1
  end
  error(format('json.decode: %s at byte %d (line %d, column %d)', msg, pos, line, pos - line_start + 1), 0)
end

-- A decoder over one text: a table of closures sharing the position.
local function decoder(text)
  local pos, depth, n = 1, 0, #text
  local D = {}

  local function fail(msg, at) decode_error(text, at or pos, msg) end

  local function skip_ws() pos = find(text, '[^ \t\n\r]', pos) or n + 1 end

  local function found()
    if pos > n then return 'the end of the text' end
    local b = byte(text, pos)
    if b >= 0x20 and b < 0x7F then return format("'%s'", string.char(b)) end
    return format('byte 0x%02x', b)
  end

  -- the code point of the \uXXXX escape at i, or fails
  local function hex4(i)
    local h = sub(text, i + 2, i + 5)
    if not h:find('^%x%x%x%x$') then fail('invalid \\u escape (it needs 4 hex digits)', i) end
    return tonumber(h, 16)
  end

  -- the escape at i (a backslash): its text and the position after it
  local function escape(i)
    local e = byte(text, i + 1)
    if e == nil then fail('unterminated string', i) end
    if simple_escapes[e] then return simple_escapes[e], i + 2 end
    if e ~= 117 then fail(format("invalid escape '\\%s'", string.char(e)), i) end
    local cp = hex4(i)
    if cp >= 0xDC00 and cp <= 0xDFFF then fail(format('unpaired low surrogate \\u%04X', cp), i) end
    if cp < 0xD800 or cp > 0xDBFF then return utf8_char(cp), i + 6 end
    if sub(text, i + 6, i + 7) ~= '\\u' then
      fail(format('high surrogate \\u%04X not followed by a low surrogate', cp), i)
    end
    local lo = hex4(i + 6)
    if lo < 0xDC00 or lo > 0xDFFF then
      fail(format('high surrogate \\u%04X followed by \\u%04X, not a low surrogate', cp, lo), i + 6)
    end
    return utf8_char(0x10000 + (cp - 0xD800) * 0x400 + (lo - 0xDC00)), i + 12
  end

  function D.string()
    local open = pos
    local parts, np = {}, 0
    local seg, i = pos + 1, pos + 1
    while true do
      local j = find(text, '[%z\1-\31"\\\128-\255]', i)
      if not j then fail('unterminated string', open) end
      local b = byte(text, j)
      if b == 34 then
        np = np + 1
        parts[np] = sub(text, seg, j - 1)
        pos = j + 1
        return np == 1 and parts[1] or concat(parts)
      elseif b == 92 then
        local piece
        piece, i = escape(j)
        parts[np + 1], parts[np + 2] = sub(text, seg, j - 1), piece
        np, seg = np + 2, i
      elseif b < 0x20 then
        fail(format('unescaped control character 0x%02x in a string', b), j)
      else
        local len = utf8_length(text, j)
        if not len then fail('invalid UTF-8 in a string', j) end
        i = j + len
      end
    end
  end

  function D.number()
    local start, p = pos, pos
    if byte(text, p) == 45 then p = p + 1 end
    local b = byte(text, p)
    if b == 48 then
      p = p + 1
      b = byte(text, p)
      if b and b >= 48 and b <= 57 then fail('leading zeros are not allowed in numbers', start) end
    elseif b and b >= 49 and b <= 57 then
      p = find(text, '[^0-9]', p) or n + 1
    else
      fail('invalid number', start)
    end
    if byte(text, p) == 46 then
      local q = find(text, '[^0-9]', p + 1) or n + 1
      if q == p + 1 then fail('a digit must follow the decimal point', q) end
      p = q
    end
    b = byte(text, p)
    if b == 101 or b == 69 then
      p = p + 1
      b = byte(text, p)
      if b == 43 or b == 45 then p = p + 1 end
      local q = find(text, '[^0-9]', p) or n + 1
      if q == p then fail('a digit must follow the exponent', q) end
      p = q
    end
    pos = p
    return tonumber(sub(text, start, p - 1))
  end

  local function enter()
    depth = depth + 1
    if depth > MAX_DEPTH then fail(format('values nested deeper than %d levels', MAX_DEPTH)) end
    pos = pos + 1
    skip_ws()
  end

  function D.object()
    enter()
    local obj = {}
    if byte(text, pos) == 125 then pos, depth = pos + 1, depth - 1; return obj end
    while true do
      skip_ws()
      if byte(text, pos) ~= 34 then fail('expected a string key, found ' .. found()) end
      local key_pos = pos
      local key = D.string()
      skip_ws()
      if byte(text, pos) ~= 58 then fail("expected ':' after an object key, found " .. found()) end
      pos = pos + 1
      local v = D.value()
      if obj[key] ~= nil then fail('duplicate key ' .. json.encode(key), key_pos) end
      obj[key] = v
      skip_ws()
      local b = byte(text, pos)
      pos = pos + 1
      if b == 125 then depth = depth - 1; return obj end
      if b ~= 44 then pos = pos - 1; fail("expected ',' or '}' in an object, found " .. found()) end
    end
  end

  function D.array()
    enter()
    local arr, len = json.array({}), 0
    if byte(text, pos) == 93 then pos, depth = pos + 1, depth - 1; return arr end
    while true do
      len = len + 1
      arr[len] = D.value()
      skip_ws()
      local b = byte(text, pos)
      pos = pos + 1
      if b == 93 then depth = depth - 1; return arr end
      if b ~= 44 then pos = pos - 1; fail("expected ',' or ']' in an array, found " .. found()) end
    end
  end

  local literals = { [116] = { 'true', true }, [102] = { 'false', false }, [110] = { 'null', json.null } }

  function D.value()
    skip_ws()
    local b = byte(text, pos)
    if b == 123 then return D.object() end
    if b == 91 then return D.array() end
    if b == 34 then return D.string() end
    if b == 45 or (b and b >= 48 and b <= 57) then return D.number() end
    local lit = literals[b]
    if lit then
      if sub(text, pos, pos + #lit[1] - 1) ~= lit[1] then fail(format('invalid literal (expected %s)', lit[1])) end
      pos = pos + #lit[1]
      return lit[2]
    end
    fail('expected a value, found ' .. found())
  end

  function D.finish()
    skip_ws()
    if pos <= n then fail('unexpected ' .. found() .. ' after the JSON value') end
  end
  return D
end

function json.decode(text)
  if type(text) ~= 'string' then error('json.decode: expected a string, got ' .. type(text), 2) end
  local D = decoder(text)
  local v = D.value()
  D.finish()
  return v
end

-- ---- encoding ------------------------------------------------------------------------------------
local escapes = { ['"'] = '\\"', ['\\'] = '\\\\', ['\b'] = '\\b', ['\f'] = '\\f', ['\n'] = '\\n',
  ['\r'] = '\\r', ['\t'] = '\\t' }

local function encode_error(path, msg)
  error(format('json.encode: %s (at %s)', msg, concat(path)), 0)
end

local function encode_string(s, path)
  local bad = invalid_utf8_at(s)
  if bad then encode_error(path, format('string is not valid UTF-8 (byte %d)', bad)) end
  return '"' .. s:gsub('[%z\1-\31"\\]', function(c) return escapes[c] or format('\\u%04x', byte(c)) end) .. '"'
end

-- Integers exactly; other numbers in the shortest form that reads back to the same double.
local function encode_number(x, path)
  if x ~= x or x == huge or x == -huge then
    encode_error(path, format('cannot encode %s (NaN and infinities are not JSON)', tostring(x)))
  end
  if x == floor(x) and x > -2 ^ 63 and x < 2 ^ 63 then
    if x == 0 and 1 / x < 0 then return '-0' end
    return format('%d', x)
  end
  for _, f in ipairs { '%.15g', '%.16g' } do
    local s = format(f, x)
    if tonumber(s) == x then return s end
  end
  return format('%.17g', x)
end

-- Every key of t.
local function keys_of(t)
  local keys = {}
  for k in each(t) do keys[#keys + 1] = k end
  return keys
end

-- 'array' (keys exactly 1..n, or marked) or 'object' (string keys; {} is an object unless marked),
-- the entry count, and an object's keys.
local function table_kind(t, path)
  local keys = keys_of(t)
  local count, max_index, non_index, non_string = #keys, 0, nil, nil
  for _, k in ipairs(keys) do
    if type(k) == 'number' and k == floor(k) and k >= 1 then
      if k > max_index then max_index = k end
    else
      non_index = non_index or k
    end
    if type(k) ~= 'string' then non_string = non_string or k end
  end
  if array_marks[t] or (count > 0 and non_index == nil) then
    if non_index ~= nil then
      encode_error(path, format('an array (json.array) has the non-index key %s', tostring(non_index)))
    end
    if max_index > count then
      encode_error(path, format('a list with holes (%d entries, index %d): use json.null for null', count, max_index))
    end
    return 'array', count
  end
  if non_string ~= nil then
    encode_error(path, format('object keys must be strings, got %s %s (a table that mixes list entries and '
      .. 'string keys is neither an array nor an object)', type(non_string), tostring(non_string)))
  end
  return 'object', count, keys
end

local encode_value

local function encode_table(t, E, path, level)
  if E.active[t] then encode_error(path, 'a table contains itself (cycles cannot be JSON)') end
  if level >= MAX_DEPTH then encode_error(path, format('values nested deeper than %d levels', MAX_DEPTH)) end
  local kind, count, keys = table_kind(t, path)
  if count == 0 then return kind == 'array' and '[]' or '{}' end
  E.active[t] = true
  local inner = E.indent and ('\n' .. E.indent:rep(level + 1)) or ''
  local close = E.indent and ('\n' .. E.indent:rep(level)) or ''
  local items, depth = {}, #path
  if kind == 'array' then
    for i = 1, count do
      path[depth + 1] = '[' .. i .. ']'
      items[i] = inner .. encode_value(t[i], E, path, level + 1)
    end
  else
    table.sort(keys)
    for i, k in ipairs(keys) do
      path[depth + 1] = '.' .. k
      items[i] = inner .. encode_string(k, path) .. E.colon .. encode_value(t[k], E, path, level + 1)
    end
  end
  path[depth + 1] = nil
  E.active[t] = nil
  local open_b, close_b = '{', '}'
  if kind == 'array' then open_b, close_b = '[', ']' end
  return open_b .. concat(items, ',') .. close .. close_b
end

function encode_value(v, E, path, level)
  local tv = type(v)
  if v == json.null then return 'null' end
  if tv == 'string' then return encode_string(v, path) end
  if tv == 'number' then return encode_number(v, path) end
  if tv == 'boolean' then return v and 'true' or 'false' end
  if tv == 'table' then return encode_table(v, E, path, level) end
  encode_error(path, 'cannot encode a value of type ' .. tv)
end

-- opts.indent: a number of spaces or an indentation string; without it the output is compact.
function json.encode(value, opts)
  opts = opts or {}
  local indent = opts.indent
  if type(indent) == 'number' then indent = (' '):rep(indent) end
  if indent ~= nil and type(indent) ~= 'string' then
    error('json.encode: indent must be a number or a string, got ' .. type(opts.indent), 2)
  end
  if indent == '' then indent = nil end
  local E = { indent = indent, colon = indent and ': ' or ':', active = {} }
  return encode_value(value, E, { '$' }, 0)
end

return json
