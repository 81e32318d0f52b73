-- etcd3.ngx for gateways, under a real nginx with 4 workers: the change
-- feed (view:changes), decoding views, several prefixes (one dict each),
-- a namespace. The spec process may run on either runtime: nginx runs the
-- module under its own LuaJIT.
local etcd3 = require "etcd3"
local helper = require "spec.helpers.etcd"
local core = require "etcd3.core"
local nginx = require "spec.helpers.nginx"

local WORKERS = 4

-- Three mirrors in one nginx: /m/ (the default log), /s/ with a log of 5
-- entries, and /m/ under the namespace /ns. Every worker follows etcd_cfg
-- with changes() into a table of its own, key -> the revision the feed
-- gave (0: read by pairs() after a RESET), published in the dict "follow".
local function config(endpoint)
  return [[
  lua_shared_dict etcd_cfg 4m;
  lua_shared_dict etcd_small 1m;
  lua_shared_dict etcd_ns 1m;
  lua_shared_dict follow 1m;
  lua_shared_dict decodes 1m;
  init_by_lua_block {
    -- one function for every request: the view decodes once per revision
    function gw_decode(value)
      ngx.shared.decodes:incr(ngx.worker.id() .. ":" .. value, 1, 0)
      if value:sub(1, 3) == "bad" then return nil, "not a route" end
      if value:sub(1, 5) == "raise" then error("decoder blew up") end
      return { route = value }
    end
  }
  init_worker_by_lua_block {
    local ngxm = require "etcd3.ngx"
    local ep = "]] .. endpoint .. [["
    ngxm.mirror { dict = "etcd_cfg", prefix = "/m/", endpoints = ep }
    ngxm.mirror { dict = "etcd_small", prefix = "/s/", endpoints = ep, log_size = 5 }
    ngxm.mirror { dict = "etcd_ns", prefix = "/m/", endpoints = ep, namespace = "/ns" }
    local ok, err = pcall(ngxm.mirror, { dict = "etcd_cfg", prefix = "/other/", endpoints = ep })
    twice_err = ok and "no error" or err
    ok, err = pcall(ngxm.mirror, { dict = "etcd_small", prefix = "/x/", endpoints = ep, log_size = 0 })
    log_size_err = ok and "no error" or err

    local view, id = ngxm.view("etcd_cfg"), ngx.worker.id()
    local function publish(t, last, resets)
      local lines = {}
      for k, r in pairs(t) do lines[#lines + 1] = k .. "=" .. r end
      table.sort(lines)
      table.insert(lines, 1, last .. "|" .. resets)
      ngx.shared.follow:set(tostring(id), table.concat(lines, ","))
    end
    assert(ngx.timer.at(0, function(premature)
      if premature then return end
      local t, last, resets = {}, -1, 0
      while not ngx.worker.exiting() do
        local list, rev = view:changes(last)
        if not list then
          assert(list == nil and rev.code == "RESET", tostring(rev))
          resets = resets + 1
          last = view:revision()
          t = {}
          for k in view:pairs() do t[k] = 0 end
        else
          for _, c in ipairs(list) do
            assert(c.revision > last and c.revision <= rev, "out of range")
            t[c.key] = c.type == "PUT" and c.revision or nil
          end
          last = rev
        end
        publish(t, last, resets)
        ngx.sleep(0.005)
      end
    end))
  }
  server {
    listen 127.0.0.1:${PORT} reuseport;
    location = / { return 200 "up"; }
    location = /feed {
      content_by_lua_block {
        local view = require("etcd3.ngx").view(ngx.var.arg_d)
        local list, rev = view:changes(tonumber(ngx.var.arg_from))
        if not list then ngx.say(ngx.worker.id(), " ", rev.code, " ", rev.message) return end
        local out = { "rev=" .. rev }
        for _, c in ipairs(list) do out[#out + 1] = c.type .. " " .. c.key .. " " .. c.revision end
        ngx.say(ngx.worker.id(), " ", table.concat(out, ";"))
      }
    }
    location = /rev {
      content_by_lua_block { ngx.say(require("etcd3.ngx").view(ngx.var.arg_d):revision()) }
    }
    location = /follow {
      content_by_lua_block {
        for id = 0, ]] .. (WORKERS - 1) .. [[ do ngx.say(id, " ", ngx.shared.follow:get(tostring(id)) or "") end
      }
    }
    location = /decoded {
      content_by_lua_block {
        local view = require("etcd3.ngx").view("etcd_cfg", { decode = gw_decode })
        local v, err = view:get(ngx.var.arg_k)
        ngx.say(ngx.worker.id(), " ", v and v.route or "<nil>", " ", err and err.code or "-",
                " ", view.cached)
      }
    }
    location = /decoded_pairs {
      content_by_lua_block {
        local view = require("etcd3.ngx").view("etcd_cfg", { decode = gw_decode })
        local out = {}
        for k, v, err in view:pairs() do
          if k:sub(1, 3) == "/m/" and k:find("dec", 1, true) then
            out[#out + 1] = k .. "=" .. (v and v.route or err.code)
          end
        end
        ngx.say(ngx.worker.id(), " ", table.concat(out, ","))
      }
    }
    location = /decodes {
      content_by_lua_block {
        for _, k in ipairs(ngx.shared.decodes:get_keys(0)) do ngx.say(k, " ", ngx.shared.decodes:get(k)) end
      }
    }
    location = /writer {
      content_by_lua_block { ngx.say(ngx.shared.etcd_cfg:get("\0etcd3:writer") or 0) }
    }
    location = /args {
      content_by_lua_block {
        local ngxm = require "etcd3.ngx"
        local function e(f, ...) local ok, err = pcall(f, ...) ngx.say(ok and "no error" or err) end
        e(ngxm.view, "etcd_cfg", { decode = 1 })
        e(ngxm.view, "etcd_cfg", { decoder = print })
        e(function() return ngxm.view("etcd_cfg"):changes("x") end)
        e(function() return ngxm.view("etcd_cfg"):changes(1.5) end)
        ngx.say(twice_err)
        ngx.say(log_size_err)
      }
    }
  }
]]
end

local function sh(cmd) assert(helper.sh(cmd), cmd) end

--- An nginx with one mirror of `prefix` into etcd_cfg (a dict of `size`)
-- that nothing follows: /feed and /rev as above, and `locations`.
local function one_mirror(endpoint, size, prefix, locations)
  return [[
    lua_shared_dict etcd_cfg ]] .. size .. [[;
    init_worker_by_lua_block {
      require("etcd3.ngx").mirror { dict = "etcd_cfg", prefix = "]] .. prefix .. [[", endpoints = "]] .. endpoint
    .. [[" }
    }
    server {
      listen 127.0.0.1:${PORT} reuseport;
      location = / { return 200 "up"; }
  ]] .. locations .. config("-"):match("(    location = /feed .-\n    }\n)") .. [[
      location = /rev {
        content_by_lua_block { ngx.say(require("etcd3.ngx").view(ngx.var.arg_d):revision()) }
      }
    }
  ]]
end

--- /feed of dict `d` from `from`, asked of every worker (24 connections):
-- every worker must give the same answer -> that answer.
local function feed(server, d, from)
  local answer
  helper.wait_for(function()
    local seen = server:ask_all(("/feed?d=%s&from=%d"):format(d, from), 24)
    answer = nil
    for id = 0, WORKERS - 1 do
      if not seen[id] then return false end
      for a in pairs(seen[id]) do
        answer = answer or a
        -- (a worker asked a little later may see a newer copy)
        if a ~= answer then return false end
      end
    end
    return true
  end, 30, "the same feed from every worker")
  return answer
end

--- A feed's text -> { { type, key, revision }, … }, the revision it reaches.
local function parse(answer)
  local rev = tonumber(answer:match("^rev=(%d+)"))
  assert(rev, "a list, not " .. answer)
  local list = {}
  for t, k, r in answer:gmatch(";(%u+) (%S+) (%d+)") do list[#list + 1] = { t, k, tonumber(r) } end
  return list, rev
end

--- key -> mod revision under `prefix` at `revision` (nil: now).
local function state(cli, prefix, revision)
  local res = assert(cli:get(prefix, { prefix = true, revision = revision }))
  local t = {}
  for _, kv in ipairs(res.kvs) do t[kv.key] = kv.mod_revision end
  return t, res.header.revision
end

--- Replays `list` over `before` (key -> mod revision): it must give
-- `after` exactly, the feed being in revision order within (from, to].
local function replays(before, list, after, from, to)
  local t, last = {}, from
  for k, r in pairs(before) do t[k] = r end
  for _, c in ipairs(list) do
    assert.is_true(c[3] > from and c[3] <= to and c[3] >= last, "revision order")
    last = c[3]
    t[c[2]] = c[1] == "PUT" and c[3] or nil
  end
  assert.are.same(after, t)
end

--- Waits until every worker's follower equals etcd's prefix at the copy's
-- revision (key -> mod revision; 0, read after a RESET, matches any).
-- -> the number of RESETs each worker met
local function followers_exact(server, cli)
  local resets, body
  local ok, err = pcall(helper.wait_for, function()
    resets, body = {}, server:get("/follow")
    for id, rest in body:gmatch("(%d+) ([^\n]*)") do
      local last, n = rest:match("^(%d+)|(%d+)")
      if not last or tonumber(last) < 1 then return false end
      local want = state(cli, "/m/", tonumber(last))
      local got = {}
      for k, r in rest:gmatch(",([^=,]+)=(%d+)") do got[k] = tonumber(r) end
      for k, r in pairs(want) do
        if got[k] == nil or got[k] ~= 0 and got[k] ~= r then return false end
      end
      for k in pairs(got) do if want[k] == nil then return false end end
      resets[tonumber(id)] = tonumber(n)
    end
    for id = 0, WORKERS - 1 do if not resets[id] then return false end end
    return true
  end, 30, "every worker's follower to equal etcd")
  assert(ok, tostring(err) .. "; they are:\n" .. tostring(body))
  return resets
end

local function copy_at(server, d, revision)
  helper.wait_for(function() return tonumber((server:get("/rev?d=" .. d))) >= revision end, 30,
    d .. " to reach revision " .. revision)
end

--- A put under `prefix`, once the copy in dict `d` has it -> key ->
-- mod revision under the prefix then, and that revision (the copy's
-- revision moves only with changes under its prefix).
local function settle(server, cli, d, prefix)
  local rev = assert(cli:put(prefix .. "mark", "m")).header.revision
  copy_at(server, d, rev)
  return state(cli, prefix, rev), rev
end

describe("etcd3.ngx for gateways", function()
  local member, cli, server

  setup(function()
    member = helper.single()
    cli = assert(etcd3.new { endpoints = member.endpoint })
    for i = 1, 5 do assert(cli:put("/m/k" .. i, "v" .. i)) end
    assert(cli:put("/ns/m/a", "in the namespace"))
    server = nginx.start(config(member.endpoint), WORKERS)
  end)

  teardown(function() nginx.stop_all(server, cli, member) end)

  it("feeds puts, deletes and a multi-key txn, each key, to every worker", function()
    local before, from = settle(server, cli, "etcd_cfg", "/m/")
    assert.are.equal("rev=" .. from, feed(server, "etcd_cfg", from))
    local r1 = assert(cli:put("/m/a", "1")).header.revision
    local r2 = assert(cli:put("/m/b", "2")).header.revision
    local r3 = assert(cli:delete("/m/a")).header.revision
    local op = etcd3.op
    local r4 = assert(cli:txn():success(op.put("/m/t1", "x"), op.put("/m/t2", "y"), op.delete("/m/k1"),
      op.put("/outside", "z")):commit()).header.revision
    local r5 = assert(cli:put("/m/a", "again")).header.revision
    assert(cli:put("/outside", "not in the feed"))
    copy_at(server, "etcd_cfg", r5)
    local list, rev = parse(feed(server, "etcd_cfg", from))
    assert.are.equal(r5, rev)
    assert.are.same({
      { "PUT", "/m/a", r1 }, { "PUT", "/m/b", r2 }, { "DELETE", "/m/a", r3 },
      { "DELETE", "/m/k1", r4 }, { "PUT", "/m/t1", r4 }, { "PUT", "/m/t2", r4 },
      { "PUT", "/m/a", r5 },
    }, (function()
      -- (etcd orders a txn's events by its ops: sort within a revision by key)
      table.sort(list, function(x, y) if x[3] ~= y[3] then return x[3] < y[3] end return x[2] < y[2] end)
      return list
    end)())
    replays(before, list, state(cli, "/m/", rev), from, rev)
    -- from the middle: only what came after
    local tail = parse(feed(server, "etcd_cfg", r4))
    assert.are.same({ { "PUT", "/m/a", r5 } }, tail)
    assert.are.equal("rev=" .. r5, feed(server, "etcd_cfg", r5))
    assert.are.equal("rev=" .. r5, feed(server, "etcd_cfg", r5 + 100))
    followers_exact(server, cli)
  end)

  it("says RESET once a small log no longer reaches back, exact within it", function()
    local _, from = settle(server, cli, "etcd_small", "/s/")
    local revs = {}
    for i = 1, 8 do revs[i] = assert(cli:put("/s/k" .. i % 3, tostring(i))).header.revision end
    copy_at(server, "etcd_small", revs[8])
    assert.matches("^RESET the change log starts after revision", feed(server, "etcd_small", from))
    local list, rev = parse(feed(server, "etcd_small", revs[4]))
    assert.are.equal(revs[8], rev)
    assert.are.same({ { "PUT", "/s/k2", revs[5] }, { "PUT", "/s/k0", revs[6] }, { "PUT", "/s/k1", revs[7] },
      { "PUT", "/s/k2", revs[8] } }, list)
  end)

  it("strips the namespace from the keys of the feed", function()
    local from = tonumber((server:get("/rev?d=etcd_ns")))
    assert(cli:put("/m/a", "outside the namespace"))
    local r = assert(cli:put("/ns/m/b", "in")).header.revision
    assert(cli:put("/ns/other", "outside the prefix"))
    copy_at(server, "etcd_ns", r)
    local list = parse(feed(server, "etcd_ns", from))
    assert.are.same({ { "PUT", "/m/b", r } }, list)
  end)

  it("decodes each value once per worker per revision, and drops what is gone", function()
    local function ask(key)
      return server:ask_all("/decoded?k=" .. key, 24)
    end
    local function decodes()
      local t = {}
      for k, n in server:get("/decodes"):gmatch("(%S+) (%d+)") do t[k] = tonumber(n) end
      return t
    end
    local r = assert(cli:put("/m/dec1", "route-a")).header.revision
    copy_at(server, "etcd_cfg", r)
    -- each worker that served the key decoded it once per revision it served
    local served = {}
    local function serve(round)
      for _ = 1, 3 do
        for id, answers in pairs(ask("/m/dec1")) do
          served[id] = served[id] or {}
          served[id][round] = true
          for a in pairs(answers) do assert.matches("^route%-a %- ", a, nil, "worker " .. id) end
        end
      end
      for k, n in pairs(decodes()) do
        if k:find("route-a", 1, true) then
          local rounds = served[tonumber(k:match("^(%d+):"))]
          assert.are.equal((rounds[1] and 1 or 0) + (rounds[2] and 1 or 0), n, k)
        end
      end
    end
    serve(1)
    -- the same value at a new revision decodes again, once
    r = assert(cli:put("/m/dec1", "route-a")).header.revision
    copy_at(server, "etcd_cfg", r)
    serve(2)
    -- values decode rejects: nil, err, logged once per worker and revision
    assert(cli:put("/m/dec2", "bad-one"))
    r = assert(cli:put("/m/dec3", "raise-one")).header.revision
    copy_at(server, "etcd_cfg", r)
    for _ = 1, 3 do
      for _, answers in pairs(ask("/m/dec2")) do
        for a in pairs(answers) do assert.matches("^<nil> INVALID_ARGUMENT ", a) end
      end
      for _, answers in pairs(ask("/m/dec3")) do
        for a in pairs(answers) do assert.matches("^<nil> INVALID_ARGUMENT ", a) end
      end
    end
    local logged = select(2, server:error_log():gsub("cannot be decoded: not a route", ""))
    assert.is_true(logged >= 1 and logged <= WORKERS, "logged " .. logged)
    assert.matches("cannot be decoded: decode raised: [^\n]*decoder blew up", server:error_log())
    -- pairs decodes too: key, value or key, nil, err
    local seen = server:ask_all("/decoded_pairs", 8)
    for _, answers in pairs(seen) do
      for a in pairs(answers) do
        assert.are.equal("/m/dec1=route-a,/m/dec2=INVALID_ARGUMENT,/m/dec3=INVALID_ARGUMENT", a)
      end
    end
    -- a deleted key leaves the cache: it never holds more than the copy
    local count = 0
    for _ in pairs(state(cli, "/m/")) do count = count + 1 end
    r = assert(cli:delete("/m/dec", { prefix = true })).header.revision
    copy_at(server, "etcd_cfg", r)
    -- (pairs in every worker: a worker's cache drops the deleted keys)
    helper.wait_for(function()
      local everywhere = server:ask_all("/decoded_pairs", 24)
      for id = 0, WORKERS - 1 do if not everywhere[id] then return false end end
      return true
    end, 30, "pairs in every worker")
    for _, answers in pairs(ask("/m/dec1")) do
      for a in pairs(answers) do
        assert.matches("^<nil> %- %d+$", a)
        assert.is_true(tonumber(a:match("(%d+)$")) <= count - 3, a)
      end
    end
  end)

  -- etcd is restarted while the writer is stopped: its watch ends, and is
  -- resumed from a compacted revision (the mirror's re-snapshot).
  it("gives the exact difference, never RESET, after a compaction while the writer was stopped", function()
    local before, from = settle(server, cli, "etcd_cfg", "/m/")
    local last = nginx.compacted_while_stopped { pid = tonumber((server:get("/writer"))), resume = "CONT",
      member = member, cli = cli, restart = true, key = "/m/stop-last", value = "done",
      changes = function()
        for i = 1, 5 do assert(cli:put("/m/stop" .. i, "while-stopped")) end
        assert(cli:put("/m/stop2", "twice"))
        assert(cli:delete("/m/stop3"))
        assert(cli:delete("/m/k2"))
        assert(cli:put("/m/tmp", "x"))
        assert(cli:delete("/m/tmp"))
      end }
    copy_at(server, "etcd_cfg", last)
    local list, rev = parse(feed(server, "etcd_cfg", from))
    replays(before, list, state(cli, "/m/", rev), from, rev)
    followers_exact(server, cli)
  end)

  it("after the writer's SIGKILL, every worker gets exact changes or RESET, never a wrong list", function()
    local before, from = settle(server, cli, "etcd_cfg", "/m/")
    local old = tonumber((server:get("/writer")))
    for i = 1, 20 do assert(cli:put("/m/kill" .. i % 7, "before" .. i)) end
    sh("kill -KILL " .. old)
    for i = 1, 20 do assert(cli:put("/m/kill" .. i % 5, "after" .. i)) end
    assert(cli:delete("/m/k3"))
    local last = assert(cli:put("/m/kill-last", "done")).header.revision
    copy_at(server, "etcd_cfg", last)
    assert.are_not.equal(old, tonumber((server:get("/writer"))))
    local answer = feed(server, "etcd_cfg", from)
    if answer:match("^rev=") then
      local list, rev = parse(answer)
      replays(before, list, state(cli, "/m/", rev), from, rev)
    else
      assert.matches("^RESET ", answer)
    end
    followers_exact(server, cli)
  end)

  it("refuses bad arguments naming the function and the option", function()
    server:refuses("/args", {
      "etcd3.ngx.view: option 'decode': function expected, got number",
      "etcd3.ngx.view: unknown option 'decoder'",
      "bad argument #1 to 'etcd3.view:changes' (integer expected, got string)",
      "bad argument #1 to 'etcd3.view:changes' (integer expected, got 1.5)",
      'etcd3.ngx.mirror: the dict "etcd_cfg" already mirrors "/m/": give each prefix',
      "etcd3.ngx.mirror: option 'log_size' must be >= 1",
    })
  end)

  it("writes steady changes from the engine thread: the writer's worker does not wake for each", function()
    -- no worker follows: they read changes() when asked (a gateway that
    -- applies them at request time), and wait only when /wait asks them to
    local quiet = nginx.start(one_mirror(member.endpoint, "4m", "/q/", [[
      location = /wait {
        content_by_lua_block {
          local rev, err = require("etcd3.ngx").view("etcd_cfg"):wait(tonumber(ngx.var.arg_rev), 10)
          ngx.say(ngx.worker.id(), " ", rev or err.code)
        }
      }
      location = /writer {
        content_by_lua_block { ngx.say(ngx.shared.etcd_cfg:get("\0etcd3:writer") or 0) }
      }
      location = /hold {
        content_by_lua_block { ngx.say(ngx.shared.etcd_cfg:add("\0etcd3:lock", 0, 5) and "held" or "taken") }
      }
      location = /release {
        content_by_lua_block { ngx.shared.etcd_cfg:delete("\0etcd3:lock") ngx.say("released") }
      }
  ]]), WORKERS)
    finally(function() quiet:stop() end)
    local wakes = require("spec.helpers.process").main_thread_wakes
    local before, from = settle(quiet, cli, "etcd_cfg", "/q/")
    -- every worker waits once (then its feed reader stays until idle)
    local waited = {}
    helper.wait_for(function()
      for id, answers in pairs(quiet:ask_all("/wait?rev=" .. (from - 1), 24)) do
        if answers[tostring(from)] then waited[id] = true end
      end
      return #waited == WORKERS - 1 and waited[0]
    end, 30, "a wait in every worker")
    local writer = tonumber((quiet:get("/writer")))
    local others = {}
    for pid in pairs(quiet:pids()) do
      if pid ~= writer and pid ~= quiet.pid then others[#others + 1] = pid end
    end
    assert.are.equal(WORKERS - 1, #others)
    -- 60 changes, 20 ms apart: the first ones after the readers' idle time
    core.sleep(5.5)
    local w0, o0 = wakes(writer), wakes(others[1])
    local op, n, last = etcd3.op, 60, nil
    for i = 1, n do
      if i % 10 == 0 then
        last = assert(cli:txn():success(op.put("/q/t" .. i, "x"), op.delete("/q/k" .. i - 1),
          op.put("/q/t" .. i + 1, "y")):commit()).header.revision
      elseif i % 7 == 0 then
        last = assert(cli:delete("/q/k" .. i - 3)).header.revision
      else
        last = assert(cli:put("/q/k" .. i, ("v"):rep(i))).header.revision
      end
      core.sleep(0.02)
    end
    copy_at(quiet, "etcd_cfg", last)
    local woke_writer, woke_other = wakes(writer) - w0, wakes(others[1]) - o0
    io.stderr:write(("\n[gateway] %d changes: the writer's worker woke %d times, another %d"):format(
      n, woke_writer, woke_other))
    -- (its heartbeat, about once a second, and what nginx does by itself)
    assert.is_true(woke_writer < n / 3, ("the writer's worker woke %d times for %d changes"):format(woke_writer, n))
    assert.is_true(woke_other < n / 3, ("a worker woke %d times for %d changes"):format(woke_other, n))
    -- and the feed is exact in every worker
    local list, rev = parse(feed(quiet, "etcd_cfg", from))
    assert.are.equal(last, rev)
    replays(before, list, state(cli, "/q/", rev), from, rev)
    -- a wait after the idle time connects again and is woken by the next change
    local answer = quiet:get_async("/wait?rev=" .. last)
    core.sleep(0.3)
    local r = assert(cli:put("/q/after", "idle")).header.revision
    assert.matches("^%d " .. r, answer())
    -- the dict's lock held by another process (a writer of another
    -- generation, in a reload): the engine thread leaves the batch, and
    -- the Lua writer writes it once the lock is free
    copy_at(quiet, "etcd_cfg", r)
    -- (the writer's heartbeat may hold the lock for a moment)
    helper.wait_for(function() return (quiet:get("/hold")):match("^held") end, 5, "the dict's lock")
    local locked = assert(cli:put("/q/locked", "1")).header.revision
    -- (what is observed: the copy does not move while the lock is held)
    local ends = helper.now() + 0.3
    repeat
      assert.are.equal(r, tonumber((quiet:get("/rev?d=etcd_cfg"))), "the copy moved under another's lock")
      core.sleep(0.02)
    until helper.now() > ends
    assert.matches("^released", (quiet:get("/release")))
    copy_at(quiet, "etcd_cfg", locked)
    -- and the changes after it go on, the feed exact
    local again = assert(cli:put("/q/again", "2")).header.revision
    copy_at(quiet, "etcd_cfg", again)
    list, rev = parse(feed(quiet, "etcd_cfg", r))
    assert.are.same({ { "PUT", "/q/locked", locked }, { "PUT", "/q/again", again } }, list)
    assert.are.equal(again, rev)
  end)

  it("gives way to the copy in a full dict: view:err() says so, RESET further back, exact within", function()
    local small = nginx.start(one_mirror(member.endpoint, "32k", "/f/", [[
      location = /err {
        content_by_lua_block { ngx.say(0, " ", tostring(require("etcd3.ngx").view("etcd_cfg"):err())) }
      }
  ]]), WORKERS)
    finally(function() small:stop() end)
    local from = settle(small, cli, "etcd_cfg", "/f/") and tonumber((small:get("/rev?d=etcd_cfg")))
    local last
    for i = 1, 400 do last = assert(cli:put("/f/one", tostring(i))).header.revision end
    copy_at(small, "etcd_cfg", last)
    local err = small:get("/err")
    assert.matches('the dict "etcd_cfg" is full: the change log holds fewer than the last 10000 changes', err, 1, true)
    assert.matches("^RESET the change log starts after revision", feed(small, "etcd_cfg", from))
    local list, rev = parse(feed(small, "etcd_cfg", last - 3))
    assert.are.equal(last, rev)
    assert.are.same({ { "PUT", "/f/one", last - 2 }, { "PUT", "/f/one", last - 1 }, { "PUT", "/f/one", last } }, list)
  end)

  it("lets a root writer's feed wake the workers of another user, siblings only", function()
    -- OpenResty's privileged agent keeps the master's user, root, while
    -- the workers run as nginx's `user`; Debian's nginx has no agent, so
    -- a root writer and nobody's readers are made here by hand: the second
    -- reader has the writer's parent (as a worker has the agent's, the
    -- master), the first one another
    if helper.capture("id -u"):match("%d+") ~= "0" then
      pending("needs root: a writer of another user than its readers")
      return
    end
    if not helper.sh("command -v setpriv >/dev/null && test -x /usr/bin/python3") then
      pending("needs setpriv (util-linux) and /usr/bin/python3 (tools/deps.sh installs both)")
      return
    end
    -- (in /tmp, as the feed's socket: a directory nobody may cross)
    local dir = helper.capture("mktemp -d /tmp/etcd3-feedroot.XXXXXX"):match("%S+")
    finally(function() helper.sh("rm -rf '" .. dir .. "'") end)
    local reader = dir .. "/reader.py"
    local out = assert(io.open(reader, "w"))
    out:write([[
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
try:
    print("byte" if s.recv(1) else "closed")
except socket.timeout:
    print("nothing")
]])
    out:close()
    -- (the readers read their script there)
    assert(helper.sh(("chmod 755 '%s' && chmod 644 '%s'"):format(dir, reader)))
    -- the writer: posts until a post wakes a reader (10 s at most)
    local writer = helper.lua_command([[
      local core = require "etcd3.core"
      local f = assert(core.feed())
      io.write(f:path(), "\n")
      io.flush()
      local woken = 0
      for _ = 1, 500 do
        woken = f:post()
        if woken > 0 then break end
        core.sleep(0.02)
      end
      io.write("woken ", woken, "\n")
      f:close()
    ]])
    local as_nobody = "setpriv --reuid=65534 --regid=65534 --clear-groups "
    local script = ("TMPDIR=/tmp %s > %s/writer &\n"):format(writer, dir)
      .. ("for _ in $(seq 200); do [ -s %s/writer ] && break; sleep 0.05; done\n"):format(dir)
      .. ("p=$(head -1 %s/writer)\n"):format(dir)
      .. ("ls -ld \"$p\" \"$(dirname \"$p\")\" | cut -c1-10\n")
      -- (the system python: a user's own, under /root, is not for nobody;
      -- `; true`: the shell in between stays the first reader's parent)
      .. ("%s sh -c '/usr/bin/python3 %s \"$1\"; true' - \"$p\"\n"):format(as_nobody, reader)
      .. ("%s /usr/bin/python3 %s \"$p\"\n"):format(as_nobody, reader)
      .. "wait\n"
      .. ("tail -1 %s/writer\n"):format(dir)
    local got = helper.capture(script)
    assert.are.equal("drwx--x--x\nsrw-rw-rw-\nclosed\nbyte\nwoken 1\n", got)
  end)
end)
