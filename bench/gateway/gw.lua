-- Worker side of bench/gateway.py: every nginx worker keeps its own table of
-- the whole prefix, each value decoded with cjson, as a gateway does.
--
--   ours:  etcd3.ngx mirror{} (one writer, worker 0) into a lua_shared_dict;
--          each worker follows view:changes() and decodes each changed key
--          (view(dict, { decode = cjson.decode })), RESET -> view:pairs().
--   resty: lua-resty-etcd (loaded from the harness's vendor dir, not part of
--          this project) the way APISIX uses it: readdir of the prefix in
--          every worker, then watchdir from the next revision; each value
--          decoded with cjson; a compacted watch -> readdir again.
--
-- Each worker reports into lua_shared_dict gwstat: pid:W, full:W (wall time
-- its table first held `expect` keys), rev:W / t:W (its table's revision and
-- the wall time it reached it), n:W (keys held), reloads:W (full reads).
-- luacheck: globals ngx (OpenResty's global)
local ffi = require "ffi"
local cjson = require "cjson.safe"

local _M = {}

pcall(ffi.cdef, [[
  struct gw_timespec { long tv_sec; long tv_nsec; };
  int clock_gettime(int clk_id, struct gw_timespec *tp);
]])
local ts = ffi.new("struct gw_timespec")
local function wall()
  ffi.C.clock_gettime(0, ts) -- CLOCK_REALTIME, the driver's time.time()
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

local stat = ngx.shared.gwstat
local W, EXPECT
local MODE = 0 -- ours: the follow mode (init_worker's poll)
local tab, count, rev = {}, 0, 0

local function report()
  stat:set("rev:" .. W, rev)
  stat:set("t:" .. W, wall())
  stat:set("n:" .. W, count)
  if count >= EXPECT and not stat:get("full:" .. W) then stat:set("full:" .. W, wall()) end
end

local function put(key, value)
  if tab[key] == nil then count = count + 1 end
  tab[key] = value
end

local function del(key)
  if tab[key] ~= nil then count = count - 1; tab[key] = nil end
end

-- ours ------------------------------------------------------------------

local view -- ours: this worker's view of the mirror's dict

--- One step: brings this worker's table to the copy's revision (the
-- changes since its revision, or the whole copy on RESET).
local function ours_sync()
  local list, r = view:changes(rev == 0 and -1 or rev)
  if not list then -- RESET (always at the first call): read the whole copy
    r = view:revision()
    if r > 0 then
      tab, count = {}, 0
      for key, value in view:pairs() do put(key, value) end
      stat:incr("reloads:" .. W, 1, 0)
      rev = r
      report()
    end
  else
    for i = 1, #list do
      local c = list[i]
      if c.type == "DELETE" then del(c.key) else put(c.key, view:get(c.key)) end
    end
    if r ~= rev then rev = r; report() end
  end
end

--- poll > 0: look every `poll` s; 0: view:wait; < 0: only until the table
-- holds every key, then at request time (GET /route) only.
local function ours_loop(premature, poll)
  if premature then return end
  while not ngx.worker.exiting() do
    ours_sync()
    if poll < 0 and count >= EXPECT then return end
    if poll > 0 then ngx.sleep(poll) else view:wait(rev, 5) end
  end
end

-- resty -----------------------------------------------------------------

local function resty_readdir(cli, prefix)
  stat:set("read_t0:" .. W, wall())
  local res, err = cli:readdir(prefix, { timeout = 60 })
  if not res or res.status ~= 200 or type(res.body) ~= "table" then
    ngx.log(ngx.ERR, "gw resty readdir: ", tostring(err), " ", tostring(res and res.status))
    return nil
  end
  tab, count = {}, 0
  for _, kv in ipairs(res.body.kvs or {}) do put(kv.key, cjson.decode(kv.value)) end
  rev = tonumber(res.body.header.revision)
  stat:incr("reloads:" .. W, 1, 0)
  report()
  return true
end

local function resty_loop(premature, etcd, prefix)
  if premature then return end
  local resty_etcd = require "resty.etcd"
  local cli = assert(resty_etcd.new { protocol = "v3", http_host = "http://" .. etcd, serializer = "raw",
                                      timeout = 60 })
  local loaded = false
  while not ngx.worker.exiting() do
    if not loaded then
      loaded = resty_readdir(cli, prefix)
      if not loaded then ngx.sleep(0.5) end
    else
      local read, err, http_cli = cli:watchdir(prefix, { start_revision = rev + 1, timeout = 50, need_cancel = true })
      if not read then
        ngx.log(ngx.WARN, "gw resty watchdir: ", tostring(err))
        ngx.sleep(0.5)
      else
        while true do
          local chunk, cerr = read()
          if not chunk then
            if cerr ~= "timeout" then ngx.log(ngx.INFO, "gw resty watch ended: ", tostring(cerr)) end
            break
          end
          local result = chunk.result
          if result and tonumber(result.compact_revision or 0) > 0 then
            loaded = false -- compacted past rev: read everything again (APISIX does the same)
            break
          end
          local events = result and result.events
          if events and events[1] then
            for i = 1, #events do
              local ev = events[i]
              if ev.type == "DELETE" then del(ev.kv.key) else put(ev.kv.key, cjson.decode(ev.kv.value)) end
              local r = tonumber(ev.kv.mod_revision)
              if r > rev then rev = r end
            end
            report()
          end
        end
        cli:watchcancel(http_cli)
      end
    end
  end
end

-- entry points ----------------------------------------------------------

--- client: "ours" | "resty"; etcd "127.0.0.1:PORT"; prefix; expect (keys);
-- dict: the mirror's lua_shared_dict (ours)
-- poll: 0 = follow with view:wait (woken by the writer), > 0 = look at
-- view:changes() every `poll` seconds, < 0 = at request time (GET /route)
function _M.init_worker(client, etcd, prefix, expect, dict, poll)
  W, EXPECT = ngx.worker.id(), expect
  stat:set("pid:" .. W, ngx.worker.pid())
  if client == "ours" then
    local ngxm = require "etcd3.ngx"
    ngxm.mirror { dict = dict, prefix = prefix, endpoints = etcd, page_size = 1000 }
    view = ngxm.view(dict, { decode = cjson.decode })
    MODE = poll or 0
    assert(ngx.timer.at(0, ours_loop, MODE))
  else
    assert(ngx.timer.at(0, resty_loop, etcd, prefix))
  end
end

--- GET /route?k=KEY: "W REV SEQ": this worker's id, its table's revision
-- and the key's "seq" in its table (0 if absent). Ours at request time
-- (poll < 0) first brings the table up to date, as a gateway's request does.
function _M.route()
  if MODE < 0 then ours_sync() end
  local v = tab[ngx.var.arg_k or ""]
  ngx.print(W, " ", rev, " ", type(v) == "table" and v.seq or 0)
end

--- GET /status: every gwstat entry, plus the mirror dict's use, as JSON
function _M.status(dict)
  local out = {}
  for _, k in ipairs(stat:get_keys(0)) do out[k] = stat:get(k) end
  local d = dict and ngx.shared[dict]
  if d then
    out.dict_capacity = d:capacity()
    out.dict_free = d:free_space()
  end
  ngx.header["Content-Type"] = "application/json"
  ngx.print(cjson.encode(out))
end

return _M
