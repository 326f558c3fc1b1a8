/* tessera — the command: an interactive prompt, and Lua files run with the tessera package and
 * library already found.
 *
 *   tessera                              the prompt (tessera.repl), `T` preloaded
 *   tessera run FILE.lua [ARGS...]       run a script (arg[0] = FILE, arg[1..] = ARGS); a file that
 *                                        returns a recipe table runs through the recipe runner
 *                                        (tessera.recipe) with ARGS as its --key value options
 *   tessera parity FILE... [--device cuda] [--quiet]
 *   tessera --version | --help
 *
 * It embeds LuaJIT and points package.path at the Lua package: the installed copy next to the
 * binary (PREFIX/share/tessera/lua) when there is one, else this build tree's. Exit status: 0 on
 * success, 1 when a script or run fails, 2 for usage errors. */
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *USAGE =
    "usage: tessera [command] [args]\n"
    "\n"
    "  (no command)             an interactive Lua prompt with T = require 'tessera' loaded\n"
    "                           (reads lines from stdin when it is not a terminal)\n"
    "commands:\n"
    "  run FILE.lua [ARGS...]   run a Lua script with `require 'tessera'` available; a file that\n"
    "                           returns a recipe runs with ARGS as its options (--help lists them)\n"
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

/* ---- Ctrl-C for the prompt: module 'tessera.cli' ------------------------------------------------ */
static lua_State *main_state;
static volatile sig_atomic_t sigint_seen, sigint_interrupts;

static void interrupt_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  lua_sethook(L, NULL, 0, 0);
  luaL_error(L, "interrupted");
}

/* As lua.c: running code is stopped by a hook at its next call, return or instruction. Code the
   JIT compiled never runs hooks, so the handler steps aside and a second Ctrl-C ends the process. */
static void on_sigint(int sig) {
  sigint_seen = 1;
  if (sigint_interrupts) {
    signal(sig, SIG_DFL);
    lua_sethook(main_state, interrupt_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
  }
}

/* No SA_RESTART: a Ctrl-C must interrupt the prompt's poll() so that the line can be abandoned. */
static void set_sigint_handler(void (*handler)(int)) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = handler;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, NULL);
}

/* cli.sigint(mode): 'prompt' records Ctrl-C for take_sigint(); 'run' interrupts running code;
   'default' restores the default action. */
static int cli_sigint(lua_State *L) {
  const char *mode = luaL_checkstring(L, 1);
  if (!strcmp(mode, "run")) {
    sigint_seen = 0;
    sigint_interrupts = 1;
    set_sigint_handler(on_sigint);
  } else if (!strcmp(mode, "prompt") || !strcmp(mode, "default")) {
    sigint_interrupts = 0;
    lua_sethook(main_state, NULL, 0, 0); /* an interrupt that came too late to stop the code */
    sigint_seen = 0;
    set_sigint_handler(!strcmp(mode, "prompt") ? on_sigint : SIG_DFL);
  } else {
    return luaL_error(L, "tessera.cli.sigint: unknown mode '%s' (prompt, run, default)", mode);
  }
  return 0;
}

static int cli_take_sigint(lua_State *L) {
  lua_pushboolean(L, sigint_seen);
  sigint_seen = 0;
  return 1;
}

static int open_cli(lua_State *L) {
  lua_createtable(L, 0, 2);
  lua_pushcfunction(L, cli_sigint);
  lua_setfield(L, -2, "sigint");
  lua_pushcfunction(L, cli_take_sigint);
  lua_setfield(L, -2, "take_sigint");
  return 1;
}

static void preload_cli(lua_State *L) {
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "preload");
  lua_pushcfunction(L, open_cli);
  lua_setfield(L, -2, "tessera.cli");
  lua_pop(L, 2);
}

/* ---- commands ------------------------------------------------------------------------------------ */
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

/* The interactive prompt; tessera.repl returns the exit status. */
static int run_repl(lua_State *L) {
  static const char code[] =
      "return require('tessera.repl').main({ cli = require('tessera.cli'), version = ...  })";
  lua_pushcfunction(L, traceback);
  if (luaL_loadstring(L, code) != 0) {
    fprintf(stderr, "tessera: %s\n", lua_tostring(L, -1));
    return 1;
  }
  lua_pushstring(L, TESSERA_VERSION);
  if (lua_pcall(L, 1, 1, -3) != 0) {
    fprintf(stderr, "tessera: %s\n", lua_tostring(L, -1));
    return 1;
  }
  return (int)lua_tointeger(L, -1);
}

static int is_recipe(lua_State *L, int index) {
  if (!lua_istable(L, index)) return 0;
  lua_getfield(L, index, "main");
  int has_main = !lua_isnil(L, -1);
  lua_pop(L, 1);
  return has_main;
}

/* A recipe the file returned (at the top of the stack) runs through tessera.recipe.cli, which
   prints its own errors and returns the exit status. */
static int run_recipe(lua_State *L, int tb, const char *file, int argc, char **argv) {
  int recipe = lua_gettop(L);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "tessera.recipe");
  if (lua_pcall(L, 1, 1, tb) != 0) {
    fprintf(stderr, "tessera: %s\n", lua_tostring(L, -1));
    return 1;
  }
  lua_getfield(L, -1, "cli");
  lua_pushvalue(L, recipe);
  lua_createtable(L, argc, 0);
  for (int i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i + 1);
  }
  lua_pushstring(L, file);
  if (lua_pcall(L, 3, 1, tb) != 0) {
    fprintf(stderr, "tessera: %s\n", lua_tostring(L, -1));
    return 1;
  }
  return (int)lua_tointeger(L, -1);
}

static int run_file(lua_State *L, const char *file, int argc, char **argv) {
  set_args(L, file, argc, argv);
  lua_pushcfunction(L, traceback);
  int tb = lua_gettop(L);
  if (luaL_loadfile(L, file) != 0) {
    fprintf(stderr, "tessera: %s\n", lua_tostring(L, -1));
    return 1;
  }
  for (int i = 0; i < argc; i++) lua_pushstring(L, argv[i]);
  if (lua_pcall(L, argc, 1, tb) != 0) {
    fprintf(stderr, "tessera: %s\n", lua_tostring(L, -1));
    return 1;
  }
  return is_recipe(L, -1) ? run_recipe(L, tb, file, argc, argv) : 0;
}

int main(int argc, char **argv) {
  if (argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
    fputs(USAGE, stdout);
    return 0;
  }
  if (argc >= 2 && !strcmp(argv[1], "--version")) {
    printf("tessera %s\n", TESSERA_VERSION);
    return 0;
  }
  int is_run = argc >= 2 && !strcmp(argv[1], "run"), is_parity = argc >= 2 && !strcmp(argv[1], "parity");
  if (argc >= 2 && ((!is_run && !is_parity) || argc < 3)) {
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
  main_state = L;
  luaL_openlibs(L);
  set_package_path(L);
  preload_cli(L);
  int status;
  if (argc < 2)
    status = run_repl(L);
  else if (is_run)
    status = run_file(L, argv[2], argc - 3, argv + 3);
  else
    status = run_builtin(L, "parity", "return require('tessera.parity').main(arg)", argc - 2, argv + 2);
  lua_close(L);
  return status;
}
