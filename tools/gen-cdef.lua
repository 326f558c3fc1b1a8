-- gen-cdef.lua CC HEADER OUT: turns tessera.h into the text Lua's ffi.cdef reads.
-- The C preprocessor (with TESSERA_FFI defined, which drops the system includes and the
-- extern "C" wrapper) does the work, so the declarations can never drift from the header.
local cc, header, out = arg[1], arg[2], arg[3]
assert(cc and header and out, "usage: gen-cdef.lua CC HEADER OUT")

local pipe = assert(io.popen(string.format("%q -E -P -DTESSERA_FFI %q", cc, header)))
local text = pipe:read("*a")
local ok = pipe:close()
if not ok or #text == 0 then error("gen-cdef: the preprocessor failed on " .. header) end

os.execute(string.format("mkdir -p %q", out:match("^(.*)/[^/]*$")))
local f = assert(io.open(out .. ".tmp", "w"))
f:write("-- generated from runtime/include/tessera.h at build time; do not edit\nreturn [==[\n",
        text, "\n]==]\n")
f:close()
assert(os.rename(out .. ".tmp", out))
