-- options_spec.lua — core.options, the one check of the options tables every module takes:
-- nil is {}, a non-table (a tensor included) is an error, unknown keys are an error that lists the
-- valid names sorted, whether they come as a set, a defaults table or a list.
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
