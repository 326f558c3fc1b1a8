-- tessera.each — the table iterator tessera's Lua uses instead of `pairs`: `for k, v in each(t)`.
--
-- Debian 12's LuaJIT (2.1.0-beta3, git 2022-03-20) has LuaJIT bug #827: a loop written
-- `for k, v in pairs(t)` compiles to the specialised ITERN bytecode, and once the JIT blacklists
-- such a loop it patches it into a form that can end it early, silently skipping entries (a
-- checkpoint missing a tensor, an optimizer group left out). The parser chooses ITERN only when the
-- iterator is spelt `pairs` or `next`, so the same loop over `each(t)` runs the generic ITERC form,
-- which the bug does not reach. It is still compiled, at a few nanoseconds more per entry.
-- tests/lint_spec.lua keeps `pairs` and `next` loops out of lua/, recipes/ and tools/.
return pairs
