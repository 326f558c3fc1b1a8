/* tessera — the command: runs Lua files with the tessera package and library already found.
 *
 *   tessera run FILE.lua [ARGS...]   run a script (arg[0] = FILE, arg[1..] = ARGS)
 *   tessera --version | --help
 *
 * It embeds LuaJIT and points package.path at the Lua package: the installed copy next to the
 * binary (PREFIX/share/tessera/lua) when there is one, else this build tree's. */
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *USAGE =
    "usage: tessera <command> [args]\n"
    "\n"
    "commands:\n"
    "  run FILE.lua [ARGS...]   run a Lua script with `require 'tessera'` available\n"
    "  parity FILE... [--device cuda] [--quiet]\n"
    "                           check against reference files of the official UM-MAE code\n"
    "  --version                print the version\n"
    "  --help                   print this help\n";

static int file_exists(const char *path) {
  struct stat st;
  return stat(path, &st) == 0;
}

/* The Lua package directories: installed layout if present beside the binary, else the build. */
static void package_dirs(char *first, char *second, size_t len) {
  char exe[PATH_MAX] = {0}, probe[PATH_MAX + 64];
  ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (n > 0) {
    char *slash = strrchr(exe, '/');
    if (slash) *slash = '\0';
    snprintf(probe, sizeof probe, "%s/../share/tessera/lua/tessera/init.lua", exe);
    if (file_exists(probe)) {
      snprintf(first, len, "%s/../share/tessera/lua", exe);
      snprintf(second, len, "%s/../share/tessera/lua", exe);
      return;
    }
  }
  snprintf(first, len, "%s", TESSERA_BUILD_LUA_DIR);
  snprintf(second, len, "%s", TESSERA_SOURCE_LUA_DIR);
}

static void set_package_path(lua_State *L) {
  char first[PATH_MAX], second[PATH_MAX];
  package_dirs(first, second, sizeof first);
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "path");
  lua_pushfstring(L, "%s/?.lua;%s/?.lua;%s/?/init.lua;%s", first, second, second, lua_tostring(L, -1));
  lua_setfield(L, -3, "path");
  lua_pop(L, 2);
}

static int traceback(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  luaL_traceback(L, L, msg ? msg : "(error object is not a string)", 1);
  return 1;
}

/* Sets the global `arg`: [0] = name, [1..] = the arguments. */
static void set_args(lua_State *L, const char *name, int argc, char **argv) {
  lua_createtable(L, argc, 1);
  lua_pushstring(L, name);
  lua_rawseti(L, -2, 0);
  for (int i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i + 1);
  }
  lua_setglobal(L, "arg");
}

/* Runs a built-in command written in Lua: `code` sees the arguments in `arg` and returns true
   for success. */
static int run_builtin(lua_State *L, const char *name, const char *code, int argc, char **argv) {
  set_args(L, name, argc, argv);
  /* errors here are about the user's input and already name the problem: no traceback */
  if (luaL_loadstring(L, code) != 0 || lua_pcall(L, 0, 1, 0) != 0) {
    fprintf(stderr, "tessera %s: %s\n", name, lua_tostring(L, -1));
    return 1;
  }
  return lua_toboolean(L, -1) ? 0 : 1;
}

static int run_file(lua_State *L, const char *file, int argc, char **argv) {
  set_args(L, file, argc, argv);
  lua_pushcfunction(L, traceback);
  if (luaL_loadfile(L, file) != 0) {
    fprintf(stderr, "tessera: %s\n", lua_tostring(L, -1));
    return 1;
  }
  for (int i = 0; i < argc; i++) lua_pushstring(L, argv[i]);
  if (lua_pcall(L, argc, 0, -2 - argc) != 0) {
    fprintf(stderr, "tessera: %s\n", lua_tostring(L, -1));
    return 1;
  }
  return 0;
}

int main(int argc, char **argv) {
  if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
    fputs(USAGE, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  if (!strcmp(argv[1], "--version")) {
    printf("tessera %s\n", TESSERA_VERSION);
    return 0;
  }
  int is_run = !strcmp(argv[1], "run"), is_parity = !strcmp(argv[1], "parity");
  if ((!is_run && !is_parity) || argc < 3) {
    if (is_run || is_parity)
      fprintf(stderr, "tessera %s: missing file\n\n%s", argv[1], USAGE);
    else
      fprintf(stderr, "tessera: unknown command '%s'\n\n%s", argv[1], USAGE);
    return 2;
  }
  lua_State *L = luaL_newstate();
  if (!L) {
    fprintf(stderr, "tessera: cannot create a Lua state\n");
    return 1;
  }
  luaL_openlibs(L);
  set_package_path(L);
  int status = is_run ? run_file(L, argv[2], argc - 3, argv + 3)
                      : run_builtin(L, "parity", "return require('tessera.parity').main(arg)", argc - 2, argv + 2);
  lua_close(L);
  return status;
}
