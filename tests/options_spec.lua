-- options_spec.lua — core.options, the one check of the options tables every module takes:
-- nil is {}, a non-table (a tensor included) is an error, unknown keys are an error that lists the
-- valid names sorted, whether they come as a set, a defaults table or a list. Also the per-value
-- argument checks (core.check_integer, core.check_number, ...) the modules share.
local T = require 'tessera'
local S = require 'support'
local core = require 'tessera.core'

describe('core.options', function()
  it('gives {} for nil and returns the table itself otherwise', function()
    assert.are.same({}, core.options('op', nil, { a = true }))
    local opts = { a = 1 }
    assert.are.equal(opts, core.options('op', opts, { a = true }))
    assert.are.equal(opts, core.options('op', opts))   -- no valid names: any key passes
  end)

  it('refuses a non-table and a tensor, naming the op and what it got', function()
    S.assert_error(function() core.options('op', 3) end, 'op: options must be a table, got number')
    S.assert_error(function() core.options('op', 'x', { a = true }) end, 'op: options must be a table, got string')
    S.assert_error(function() core.options('op', T.ones(1)) end, 'op: options must be a table, got a tensor')
  end)

  it('refuses unknown keys, listing the valid names sorted', function()
    local msg = "op: unknown option 'c' (valid: a, b, d)"
    S.assert_error(function() core.options('op', { c = 1 }, { d = true, b = true, a = true }) end, msg)
    S.assert_error(function() core.options('op', { c = 1 }, { 'd', 'b', 'a' }) end, msg)
    S.assert_error(function() core.options('op', { 1 }, { a = true }) end, "op: unknown option '1' (valid: a)")
  end)

  it('takes every key of a defaults table as valid, false defaults included', function()
    local opts = { nesterov = true, lr = 0.1 }
    assert.are.equal(opts, core.options('SGD', opts, { lr = 1e-3, nesterov = false }))
    assert.are.equal(opts, core.options('SGD', opts, { 'lr', 'nesterov' }))
  end)

  it('raises at level 0, so the message starts with the op', function()
    local ok, err = pcall(core.options, 'op', { z = 1 }, { a = true })
    assert.is_false(ok)
    assert.are.equal("op: unknown option 'z' (valid: a)", err)
  end)
end)

describe('core.sorted_names', function()
  it('sorts the names of a set or a list as strings', function()
    assert.are.same({ 'a', 'b', 'c' }, core.sorted_names({ c = true, a = true, b = false }))
    assert.are.same({ 'a', 'b', 'c' }, core.sorted_names({ 'b', 'c', 'a' }))
    assert.are.same({}, core.sorted_names({}))
  end)
end)

describe('core argument checks', function()
  it('return the value, or the default for nil when one is given', function()
    assert.are.equal(3, core.check_integer('op', 'n', 3, 0))
    assert.are.equal(-7, core.check_integer('op', 'n', -7))
    assert.are.equal(90, core.check_integer('op', 'quality', nil, 1, 90))
    assert.are.equal(math.huge, core.check_number('op', 'x', math.huge))
    assert.are.equal(0, core.check_nonnegative('op', 'lr', 0))
    assert.are.equal(1e-8, core.check_positive('op', 'eps', 1e-8))
    assert.is_false(core.check_boolean('op', 'keepdim', nil, false))
    assert.is_true(core.check_boolean('op', 'keepdim', true, false))
    assert.are.equal('a', core.check_string('op', 'path', 'a'))
  end)

  it('refuse nil without a default', function()
    S.assert_error(function() core.check_boolean('op', 'flag', nil) end, 'op: flag must be a boolean, got nil')
    S.assert_error(function() core.check_number('op', 'x', nil) end, 'op: x must be a number, got nil')
  end)

  it('hold the bounds: inclusive for integers and >= 0, exclusive for > 0, finite where they say so', function()
    S.assert_error(function() core.check_integer('op', 'n', -1, 0) end, 'op: n must be a non-negative integer, got -1')
    S.assert_error(function() core.check_integer('op', 'k', 0, 1) end, 'op: k must be an integer >= 1, got 0')
    S.assert_error(function() core.check_integer('op', 'k', 1.5) end, 'op: k must be an integer, got 1.5')
    S.assert_error(function() core.check_number('op', 'x', 0 / 0) end, 'op: x must be a number, got nan')
    S.assert_error(function() core.check_nonnegative('op', 'lr', -1e-9) end, 'op: lr must be a finite number >= 0')
    S.assert_error(function() core.check_nonnegative('op', 'lr', math.huge) end, 'got inf')
    S.assert_error(function() core.check_positive('op', 'eps', 0) end, 'op: eps must be a finite number > 0, got 0')
    S.assert_error(function() core.check_positive('op', 'eps', 0 / 0) end, 'got nan')
  end)

  it('show the value they got: strings quoted, tables and tensors by their kind', function()
    S.assert_error(function() core.check_number('op', 'x', '3') end, "op: x must be a number, got '3'")
    S.assert_error(function() core.check_boolean('op', 'flag', {}) end, 'op: flag must be a boolean, got table')
    S.assert_error(function() core.check_string('op', 'path', T.ones(1)) end, 'op: path must be a string, got a tensor')
  end)

  it('raise at level 0, so the message starts with the op', function()
    local ok, err = pcall(core.check_integer, 'op', 'n', 'x', 0)
    assert.is_false(ok)
    assert.are.equal("op: n must be a non-negative integer, got 'x'", err)
  end)
end)
