-- Summarises what bench/profile.sh recorded (bench/README.md, "Where the
-- time goes"):
--   lua5.4 bench/profile_summary.lua OUT SMALL LARGE CG_LARGE
-- Per workload: syscalls per operation (strace -c), the share of perf's
-- cpu-clock samples per group of shared objects (kernel, Lua VM, gRPC, ...),
-- and callgrind's user-space instructions per operation, per group and for
-- the top functions. Per-operation figures are differences between a large
-- and a small run divided by the difference of sizes, so process start-up,
-- dynamic linking and connecting cancel out.
local OUT, SMALL, LARGE, CG_LARGE = arg[1], tonumber(arg[2]), tonumber(arg[3]), tonumber(arg[4])
assert(OUT and SMALL and LARGE and CG_LARGE, "usage: profile_summary.lua OUT SMALL LARGE CG_LARGE")

local function lines(path)
  local f = io.open(path)
  if not f then return function() return nil end end
  return function()
    local l = f:read("l")
    if not l then f:close() end
    return l
  end
end

-- Which part of the client a shared object belongs to.
local function group(obj)
  local base = obj:match("([^/]+)$") or obj
  if base:find("^lua5%.4") or base:find("^liblua") then return "Lua VM (interpreter, GC, std libs)" end
  if base == "core.so" then return "etcd3.core (C module)" end
  if base:find("^libprotobuf%-c") then return "protobuf-c (codec)" end
  if base:find("^libgrpc") or base:find("^libgpr") or base:find("^libabsl") or base:find("^libupb")
    or base:find("^libaddress_sorting") or base:find("^libcares") or base:find("^libre2") then
    return "gRPC C core (+absl, upb)"
  end
  if base:find("^libc%.so") or base:find("^libc%-") then return "libc" end
  if base:find("^ld%-linux") then return "dynamic linker" end
  if base:find("kernel") or base:find("^%[") then return "kernel" end
  return "other: " .. base
end

-- strace -c: calls per syscall.
local function strace(path)
  local calls, total = {}, 0
  for l in lines(path) do
    local f = {}
    for w in l:gmatch("%S+") do f[#f + 1] = w end
    if (#f == 5 or #f == 6) and tonumber(f[1]) and f[#f] ~= "total" then
      local n = tonumber(f[4])
      calls[f[#f]], total = n, total + n
    end
  end
  return calls, total
end

-- One callgrind.out file (one thread): self cost (Ir) per function and per
-- object, and the inclusive cost of the calls from the Lua VM into
-- etcd3.core, per entry point.
local function callgrind_file(path, acc)
  local names = { ob = {}, fn = {} }
  local function name(kind, s)
    local id, rest = s:match("^%((%d+)%)%s*(.*)$")
    if not id then return s end
    if rest ~= "" then names[kind][id] = rest end
    return names[kind][id] or ("?" .. id)
  end
  local ob, fn, cob, cfn, call = "?", "?", nil, nil, false
  local total = 0
  for l in lines(path) do
    local key, val = l:match("^(%a+)=(.*)$")
    if key then
      if key == "ob" then ob = name("ob", val)
      elseif key == "fn" then fn = name("fn", val)
      elseif key == "cob" then cob = name("ob", val)
      elseif key == "cfn" then cfn = name("fn", val)
      elseif key == "calls" then call = true -- the next cost line is the callee's, inclusive
      end
    elseif l:find("^[%d%+%-%*]") then
      local ir = tonumber(l:match("(%d+)%s*$")) or 0
      if call then
        local callee_ob = cob or ob
        if group(ob):find("^Lua VM") and group(callee_ob):find("^etcd3%.core") then
          acc.boundary[cfn] = (acc.boundary[cfn] or 0) + ir
        end
        call, cob = false, nil
      else
        local k = fn .. "\0" .. ob
        acc.by_fn[k] = (acc.by_fn[k] or 0) + ir
        acc.by_ob[ob] = (acc.by_ob[ob] or 0) + ir
        total = total + ir
      end
    end
  end
  return total
end

-- All threads of one run: callgrind --separate-threads=yes writes
-- PATH-01 (the main thread), PATH-02, ...
local function callgrind(path)
  local acc = { by_fn = {}, by_ob = {}, boundary = {}, main = 0, others = 0 }
  local ls = io.popen("ls " .. path .. "-* 2>/dev/null")
  for file in ls:lines() do
    local t = callgrind_file(file, acc)
    if file:match("%-0*1$") then acc.main = acc.main + t else acc.others = acc.others + t end
  end
  ls:close()
  acc.total = acc.main + acc.others
  acc.by_fn.total, acc.by_ob.total, acc.boundary.total = nil, nil, nil
  return acc
end

-- perf report --sort dso: percentages per shared object.
local function perf_dso(path)
  local share = {}
  for l in lines(path) do
    local pct, dso = l:match("^%s*([%d%.]+)%%%s+(%S+)")
    if pct then share[dso] = tonumber(pct) end
  end
  return share
end

local function sorted(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) return t[a] > t[b] end)
  return keys
end

local function diff(large, small, per)
  local d = {}
  for k, v in pairs(large) do d[k] = (v - (small[k] or 0)) / per end
  return d
end

local MODES = { A = "serial put", B = "serial get (linearizable)", C = "serial get (serializable)",
  D = "64 puts in flight" }
for _, id in ipairs { "A", "B", "C", "D" } do
  print(("## %s %s"):format(id, MODES[id]))
  print()
  local cs, ts = strace(("%s/strace-%s-%d.txt"):format(OUT, id, SMALL))
  local cl, tl = strace(("%s/strace-%s-%d.txt"):format(OUT, id, LARGE))
  if tl > 0 then -- (not with CALLGRIND_ONLY)
    local per = diff(cl, cs, LARGE - SMALL)
    local parts = {}
    for _, k in ipairs(sorted(per)) do
      if per[k] >= 0.05 then parts[#parts + 1] = ("%s %.2f"):format(k, per[k]) end
    end
    print(("syscalls per op (strace -c -f, %d - %d ops): %.2f: %s"):format(LARGE, SMALL,
      (tl - ts) / (LARGE - SMALL), table.concat(parts, ", ")))
    print()

    local share = perf_dso(("%s/perf-%s-dso.txt"):format(OUT, id))
    local g = {}
    for dso, pct in pairs(share) do g[group(dso)] = (g[group(dso)] or 0) + pct end
    parts = {}
    for _, k in ipairs(sorted(g)) do parts[#parts + 1] = ("%s %.1f %%"):format(k, g[k]) end
    print("perf cpu-clock samples by part: " .. table.concat(parts, ", "))
    print()
  end

  local small = callgrind(("%s/callgrind-%s-%d.out"):format(OUT, id, SMALL))
  local large = callgrind(("%s/callgrind-%s-%d.out"):format(OUT, id, CG_LARGE))
  local n = CG_LARGE - SMALL
  local total = (large.total - small.total) / n
  local main, others = (large.main - small.main) / n, (large.others - small.others) / n
  local entry = diff(large.boundary, small.boundary, n)
  local inside = 0
  for _, v in pairs(entry) do inside = inside + v end
  print(("callgrind: %.0f user-space instructions per op (%d - %d ops): main thread %.0f "
    .. "(Lua layer, outside calls into etcd3.core: %.0f; inside them: %.0f), gRPC's and the engine's threads %.0f"):format(
    total, CG_LARGE, SMALL, main, main - inside, inside, others))
  -- Go clientv3's driver on the same workload (all threads: goroutines
  -- move between them), when profile.sh found it built
  local go_small = callgrind(("%s/callgrind-go-%s-%d.out"):format(OUT, id, SMALL))
  local go_large = callgrind(("%s/callgrind-go-%s-%d.out"):format(OUT, id, CG_LARGE))
  if go_large.total > 0 then
    local go = (go_large.total - go_small.total) / n
    print()
    print(("Go clientv3, same workload and sizes: %.0f user-space instructions per op; lua-etcd3 / Go %.2f"):format(
      go, total / go))
  end
  local parts = {}
  for i, k in ipairs(sorted(entry)) do
    if i > 6 then break end
    parts[#parts + 1] = ("`%s` %.0f"):format(k, entry[k])
  end
  print()
  print("calls into etcd3.core, inclusive, per op: " .. table.concat(parts, ", "))
  print()
  local og = {}
  for ob, v in pairs(diff(large.by_ob, small.by_ob, n)) do og[group(ob)] = (og[group(ob)] or 0) + v end
  print("| part (self cost, all threads) | instructions/op | share |")
  print("|---|---:|---:|")
  for _, k in ipairs(sorted(og)) do
    if math.abs(og[k]) >= total * 0.005 then print(("| %s | %.0f | %.1f %% |"):format(k, og[k], 100 * og[k] / total)) end
  end
  print()
  print("| top functions (self) | object | instructions/op | share |")
  print("|---|---|---:|---:|")
  local fd = diff(large.by_fn, small.by_fn, n)
  for i, k in ipairs(sorted(fd)) do
    if i > 25 then break end
    local fn, ob = k:match("^(.-)%z(.*)$")
    if #fn > 70 then fn = fn:sub(1, 67) .. "..." end
    print(("| `%s` | %s | %.0f | %.1f %% |"):format(fn, ob:match("([^/]+)$") or ob, fd[k], 100 * fd[k] / total))
  end
  print()
end
