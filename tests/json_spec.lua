-- json_spec.lua — T.json: the strict RFC 8259 decoder (escapes, surrogates, numbers, nesting,
-- whitespace, errors with positions) and the deterministic encoder (round trips).
local each = require 'tessera.each'
local T = require 'tessera'
local S = require 'support'
local json = T.json

describe('json.decode', function()
  it('decodes scalars, containers and whitespace', function()
    assert.are.equal(1, json.decode('1'))
    assert.are.equal('x', json.decode(' \t\r\n"x"\n '))
    assert.is_true(json.decode('true'))
    assert.is_false(json.decode('false'))
    assert.are.equal(json.null, json.decode('null'))
    local v = json.decode(' { "a" : [ 1 , { } , [ ] , null ] ,\n\t"b" : { "c" : false } } ')
    assert.are.equal(1, v.a[1])
    assert.are.same({}, v.a[2])
    assert.is_false(json.is_array(v.a[2]))
    assert.is_true(json.is_array(v.a[3]))
    assert.are.equal(json.null, v.a[4])
    assert.are.equal(4, #v.a)
    assert.is_false(v.b.c)
  end)

  it('decodes numbers with signs, fractions and exponents', function()
    local cases = {
      ['0'] = 0, ['-0'] = 0, ['12'] = 12, ['-7'] = -7, ['3.25'] = 3.25, ['-0.5'] = -0.5,
      ['1e3'] = 1000, ['1E+3'] = 1000, ['2.5e-3'] = 0.0025, ['-1.5E2'] = -150, ['0e0'] = 0,
      ['1.0000000000000002'] = 1.0000000000000002, ['9007199254740993'] = 9007199254740992,
      ['1e400'] = math.huge, ['4.9e-324'] = 4.9e-324,
    }
    for text, want in each(cases) do assert.are.equal(want, json.decode(text), text) end
    assert.are.equal(-math.huge, 1 / json.decode('-0'))
  end)

  it('decodes every escape, surrogate pairs and raw UTF-8', function()
    assert.are.equal('"\\/\b\f\n\r\t', json.decode([["\"\\\/\b\f\n\r\t"]]))
    assert.are.equal('A\0B', json.decode([["\u0041\u0000B"]]))
    assert.are.equal('é', json.decode([["\u00e9"]]))
    assert.are.equal('é', json.decode([["\u00E9"]]))
    assert.are.equal('€', json.decode([["\u20ac"]]))
    assert.are.equal('😀', json.decode([["\ud83d\ude00"]]))
    assert.are.equal('\u{10FFFF}', json.decode([["\udbff\udfff"]]))
    assert.are.equal('x😀y', json.decode('"x😀y"'))
    assert.are.equal('héllo wörld ✓', json.decode('"héllo wörld ✓"'))
    assert.are.equal('', json.decode('""'))
  end)

  it('decodes deep nesting up to its limit', function()
    local deep = string.rep('[', 500) .. '7' .. string.rep(']', 500)
    local v = json.decode(deep)
    for _ = 1, 500 do v = v[1] end
    assert.are.equal(7, v)
    S.assert_error(function() json.decode(string.rep('[', 600) .. string.rep(']', 600)) end, 'nested deeper than 512')
    -- encoding has the same bound: what it writes, decode reads back
    local function nested(levels)
      local top = {}
      local t = top
      for _ = 2, levels do t[1] = {}; t = t[1] end
      t[1] = 7
      return top
    end
    local text = string.rep('[', 512) .. '7' .. string.rep(']', 512)
    assert.equal(text, json.encode(nested(512)))
    assert.equal(text, json.encode(json.decode(text)))
    S.assert_error(function() json.encode(nested(513)) end, 'json.encode: values nested deeper than 512 levels')
  end)

  it('reports errors with byte, line and column', function()
    local cases = {
      { '', 'expected a value, found the end of the text at byte 1 (line 1, column 1)' },
      { '[1,]', "expected a value, found ']' at byte 4" },
      { '[1 2]', "expected ',' or ']' in an array, found '2' at byte 4" },
      { '{"a" 1}', "expected ':' after an object key, found '1' at byte 6" },
      { '{"a":1,}', "expected a string key, found '}' at byte 8" },
      { '{"a":1 "b":2}', "expected ',' or '}' in an object, found '\"' at byte 8" },
      { '{"a":1,"a":2}', 'duplicate key "a" at byte 8' },
      { '{\n  "a": tru\n}', 'invalid literal (expected true) at byte 10 (line 2, column 8)' },
      { '[nul]', 'invalid literal (expected null) at byte 2' },
      { '01', 'leading zeros are not allowed in numbers at byte 1' },
      { '-', 'invalid number at byte 1' },
      { '+1', "expected a value, found '+' at byte 1" },
      { '.5', "expected a value, found '.' at byte 1" },
      { '1.', 'a digit must follow the decimal point at byte 3' },
      { '1e+', 'a digit must follow the exponent at byte 4' },
      { '"abc', 'unterminated string at byte 1' },
      { '"a\nb"', 'unescaped control character 0x0a in a string at byte 3' },
      { '"\\x"', "invalid escape '\\x' at byte 2" },
      { '"\\u12"', 'invalid \\u escape (it needs 4 hex digits) at byte 2' },
      { '"\\ud800"', 'high surrogate \\uD800 not followed by a low surrogate at byte 2' },
      { '"\\ud800\\u0041"', 'followed by \\u0041, not a low surrogate at byte 8' },
      { '"\\udc00"', 'unpaired low surrogate \\uDC00 at byte 2' },
      { '"\255"', 'invalid UTF-8 in a string at byte 2' },
      { '"\192\175"', 'invalid UTF-8 in a string at byte 2' },        -- overlong '/'
      { '"\237\160\128"', 'invalid UTF-8 in a string at byte 2' },    -- an encoded surrogate
      { '[1] [2]', "unexpected '[' after the JSON value at byte 5" },
      { '\239\187\191{}', 'found byte 0xef at byte 1' },               -- a BOM is not JSON
      { "{'a':1}", "expected a string key, found ''' at byte 2" },
      { 'NaN', "expected a value, found 'N' at byte 1" },
    }
    for _, case in ipairs(cases) do
      S.assert_error(function() json.decode(case[1]) end, 'json.decode: ', case[2])
    end
    S.assert_error(function() json.decode(42) end, 'json.decode: expected a string, got number')
  end)
end)

describe('json.encode', function()
  it('writes compact, sorted, deterministic text', function()
    assert.are.equal('{"a":[1,2,{"c":null}],"b":true,"z":"x"}',
      json.encode({ z = 'x', b = true, a = { 1, 2, { c = json.null } } }))
    assert.are.equal('{}', json.encode({}))
    assert.are.equal('[]', json.encode(json.array()))
    assert.are.equal('[]', json.encode(json.array({})))
    assert.are.equal('"\\"\\\\\\n\\t\\u0001é/"', json.encode('"\\\n\t\1é/'))
  end)

  it('writes integers exactly and other numbers in their shortest exact form', function()
    assert.are.equal('3', json.encode(3))
    assert.are.equal('-42', json.encode(-42))
    assert.are.equal('9007199254740994', json.encode(2 ^ 53 + 2))
    assert.are.equal('4611686018427387904', json.encode(2 ^ 62))
    assert.are.equal('0.1', json.encode(0.1))
    assert.are.equal('0.3333333333333333', json.encode(1 / 3))
    assert.are.equal('1e+300', json.encode(1e300))
    assert.are.equal('-0', json.encode(-0.0))
    assert.are.equal('1e-06', json.encode(1e-6))
    for _, x in ipairs { 0.1, 1 / 3, math.pi, -2.5e-300, 1.7976931348623157e308, 5e-324, 2 ^ 70, 123456.789 } do
      assert.are.equal(x, json.decode(json.encode(x)))
    end
  end)

  it('indents when asked', function()
    local v = { b = { 1, json.array() }, a = {} }
    assert.are.equal('{\n  "a": {},\n  "b": [\n    1,\n    []\n  ]\n}', json.encode(v, { indent = 2 }))
    assert.are.equal('{\n\t"a": {},\n\t"b": [\n\t\t1,\n\t\t[]\n\t]\n}', json.encode(v, { indent = '\t' }))
    assert.are.same(v, json.decode(json.encode(v, { indent = 4 })))
  end)

  it('refuses what JSON cannot hold, saying where', function()
    S.assert_error(function() json.encode(0 / 0) end, 'json.encode: cannot encode nan', 'at $')
    S.assert_error(function() json.encode({ a = { math.huge } }) end, 'cannot encode inf', 'at $.a[1]')
    S.assert_error(function() json.encode({ 1, nil, 3 }) end, 'list with holes')
    S.assert_error(function() json.encode({ 1, x = 2 }) end, 'object keys must be strings, got number 1')
    S.assert_error(function() json.encode({ [true] = 1 }) end, 'object keys must be strings, got boolean true')
    S.assert_error(function() json.encode({ f = print }) end, 'cannot encode a value of type function', 'at $.f')
    S.assert_error(function() json.encode({ t = T.ones(1) }) end, 'type cdata')
    S.assert_error(function() json.encode('\255') end, 'not valid UTF-8')
    S.assert_error(function() json.encode(json.array({ x = 1 })) end, 'non-index key x')
    local cyc = {}
    cyc.self = { cyc }
    S.assert_error(function() json.encode(cyc) end, 'cycles', 'at $.self[1]')
    S.assert_error(function() json.encode(1, { indent = true }) end, 'indent must be a number or a string')
  end)

  it('round trips through decode', function()
    local values = {
      { 1, 2.5, -3e-7, 'x', true, false, json.null },
      { nested = { deeper = { deepest = { 'é', '😀', '\0', '\31' } } }, empty_list = json.array(), empty = {} },
      { ['key with "quotes"'] = 'and \\ backslashes', [''] = 'empty key', ['ünï'] = 'côdé' },
      'plain string', 0, -1, 1e21, json.null, false,
    }
    for _, v in ipairs(values) do
      local text = json.encode(v)
      assert.are.same(v, json.decode(text))
      assert.are.equal(text, json.encode(json.decode(text)))
    end
    -- decoding keeps an empty array an array
    assert.are.equal('{"a":[],"b":{}}', json.encode(json.decode('{"b":{},"a":[]}')))
  end)
end)
