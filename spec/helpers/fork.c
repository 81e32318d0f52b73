/*
 * fork.c - test-only module (never installed): fork(), waitpid() and
 * _exit() for the "use after fork" spec, on every runtime (Debian's
 * lua-posix has no Lua 5.4 build); run_closed() for the unload spec.
 */
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

static int l_fork(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)fork());
  return 1;
}

/* waitpid(pid) -> exit code, or -signal when killed */
static int l_waitpid(lua_State *L) {
  int status = 0;
  pid_t pid = (pid_t)luaL_checkinteger(L, 1);
  if (waitpid(pid, &status, 0) < 0) return luaL_error(L, "waitpid failed");
  lua_pushinteger(L, WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status));
  return 1;
}

static int l_exit(lua_State *L) {
  _exit((int)luaL_optinteger(L, 1, 0));
  return 0;
}

/* run_closed(code): runs the Lua code in a new state of its own, then
 * closes that state (which unloads the C modules only it loaded); returns
 * the code's error message, or nil. */
static int l_run_closed(lua_State *L) {
  const char *code = luaL_checkstring(L, 1);
  lua_State *inner = luaL_newstate();
  int failed;
  if (!inner) return luaL_error(L, "no memory for a state");
  luaL_openlibs(inner);
  failed = luaL_dostring(inner, code) != 0;
  if (failed) { /* the message through tostring: etcd3's errors are tables */
    lua_getglobal(inner, "tostring");
    lua_insert(inner, -2);
    if (lua_pcall(inner, 1, 1, 0) != 0 || !lua_isstring(inner, -1)) lua_pushliteral(L, "an error");
    else lua_pushstring(L, lua_tostring(inner, -1));
  }
  lua_close(inner);
  if (!failed) lua_pushnil(L);
  return 1;
}

int luaopen_spec_fork(lua_State *L);
int luaopen_spec_fork(lua_State *L) {
  lua_newtable(L);
  lua_pushcfunction(L, l_fork);
  lua_setfield(L, -2, "fork");
  lua_pushcfunction(L, l_waitpid);
  lua_setfield(L, -2, "waitpid");
  lua_pushcfunction(L, l_exit);
  lua_setfield(L, -2, "_exit");
  lua_pushcfunction(L, l_run_closed);
  lua_setfield(L, -2, "run_closed");
  return 1;
}
