/*
 * fork.c - test-only module (never installed): fork(), waitpid() and
 * _exit() for the "use after fork" spec, on every runtime (Debian's
 * lua-posix has no Lua 5.4 build).
 */
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <lua.h>
#include <lauxlib.h>

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

int luaopen_spec_fork(lua_State *L);
int luaopen_spec_fork(lua_State *L) {
  lua_newtable(L);
  lua_pushcfunction(L, l_fork);
  lua_setfield(L, -2, "fork");
  lua_pushcfunction(L, l_waitpid);
  lua_setfield(L, -2, "waitpid");
  lua_pushcfunction(L, l_exit);
  lua_setfield(L, -2, "_exit");
  return 1;
}
