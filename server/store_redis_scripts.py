"""The Lua scripts of the Redis Store (``store_redis.py``), one per operation.

Each script is atomic on the Redis instance: a batch of accepts, acks or
deliveries is applied whole or not at all, and a retry after a lost reply
meets either nothing or the whole batch (dedup then answers the original
msg_id).  The key layout is in ``store_redis.py``'s docstring.

Conventions, which every script follows:

* ``ARGV[1]`` is the key prefix and ``ARGV[2]`` a candidate epoch; the
  common header (:data:`_HEADER`) reads ``<p>:epoch`` and, when it is gone
  (a flushed or lost instance), sets the candidate, so the first script to
  run after the loss chooses the new epoch and every worker converges on
  it.  Every script returns ``{epoch, answer}``; the caller compares the
  epoch with the one it holds.  No extra round trip per call.
* Times, refs and other values that must come back bit-exact travel as the
  strings Python made (``repr(float)``, ``str(int)``) and are stored as
  they came: Lua's ``tostring`` keeps only 14 digits, and a ref uses all 64
  bits, more than a Lua number holds.  Comparisons use ``tonumber`` (IEEE
  doubles, as Python compares).
* Keys are built here from the prefix and the tenant (``{<tenant>}`` is the
  hash tag), which Redis standalone allows; ``store_redis.py`` says how
  each script would be split by slot under Redis Cluster.
"""

from __future__ import annotations

_HEADER = """
local P = ARGV[1]
local epoch = redis.call("GET", P .. ":epoch")
if not epoch then
  redis.call("SET", P .. ":epoch", ARGV[2])
  epoch = ARGV[2]
end
-- Lua makes a new string at every concatenation and formats a number with
-- sprintf each time one becomes a string (a key, a redis.call argument):
-- in this interpreter that is most of a script's time.  So what a script
-- names again and again is made once per run: a number's text (digits),
-- a recipient's field names (FIELDS, by index, number or string), a
-- tenant's key base.
local digits = setmetatable({}, {__index = function(t, k)
  local v = tostring(k)
  t[k] = v
  return v
end})
local FIELDS = setmetatable({}, {__index = function(t, k)
  local i = type(k) == "number" and digits[k] or k
  local v = {t = "t" .. i, q = "q" .. i, s = "s" .. i, d = "d" .. i, a = "a" .. i,
             e = "e" .. i, w = "w" .. i, i = i}
  t[k] = v
  return v
end})
local LANE = setmetatable({["0"] = {a = "a0", l = "l0"}, ["1"] = {a = "a1", l = "l1"}},
                           {__index = function(t, lane)
                             local v = {a = "a" .. lane, l = "l" .. lane}
                             t[lane] = v
                             return v
                           end})
local function tenant_of(address)
  local _, _, t = string.find(address, "^[^:]*:([^/]*)")
  return t or ""
end
local bases = {}
local function base(tenant)
  local b = bases[tenant]
  if not b then
    b = P .. ":{" .. tenant .. "}:s"
    bases[tenant] = b
  end
  return b
end
-- An inbox entry's member: msg_id, recipient index, the message's tenant
-- and flags: "r" the message asked for receipts, "1" it has one recipient
-- (its entry's end is the message's end: no counting, see finish).
local function entry_of(member)
  local _, _, id, i, tenant, flags = string.find(member, "^(%d+):(%d+):([^:]*):?(.*)$")
  return id, i, base(tenant), flags
end
-- One command for a list of arguments (in slices: unpack has a bound).
local function bulk(cmd, key, list)
  for k = 1, #list, 4000 do
    if key then
      redis.call(cmd, key, unpack(list, k, math.min(k + 3999, #list)))
    else
      redis.call(cmd, unpack(list, k, math.min(k + 3999, #list)))
    end
  end
end
-- A recipient's entry ends (acked, rejected, expired): one less open entry
-- of its message; the message is done once none is open, at the latest end.
-- B is the message's tenant's base; ends gathers, per base, what
-- flush_ends writes once per script (the unacked count, the messages done).
local function finish(ends, B, id, i, flags, state, at, reason)
  local m = B .. ":m:" .. id
  local e = ends[B]
  if not e then
    e = {unacked = 0, exp = {}, done = {}}
    ends[B] = e
  end
  e.unacked = e.unacked + 1
  local open, done = 0, at
  local single = string.find(flags, "1", 1, true)
  local F = FIELDS[i]
  if state == "acked" then
    if single then
      redis.call("HSET", m, F.s, state, F.a, at, "open", "0", "done", at)
    else
      redis.call("HSET", m, F.s, state, F.a, at)
    end
  elseif single then
    redis.call("HSET", m, F.s, state, F.e, at, F.w, reason, "open", "0", "done", at)
  else
    redis.call("HSET", m, F.s, state, F.e, at, F.w, reason)
  end
  if not single then
    open = redis.call("HINCRBY", m, "open", -1)
    done = redis.call("HGET", m, "done")
    if tonumber(at) > tonumber(done) then
      redis.call("HSET", m, "done", at)
      done = at
    end
  end
  if open <= 0 then
    e.exp[#e.exp + 1] = id
    e.done[#e.done + 1] = done
    e.done[#e.done + 1] = id
  end
end
local function flush_ends(ends)
  for B, e in pairs(ends) do
    redis.call("HINCRBY", B .. ":n", "unacked", -e.unacked)
    bulk("ZREM", B .. ":exp", e.exp)
    bulk("ZADD", B .. ":done", e.done)
  end
end
-- A message's payload, the string ``<m>:p``: its header, a newline, its
-- body.  The header is the JSON array [tenant, sender, ref, lane, kind, to,
-- created, receipt] the node made (what never changes; JSON has no raw
-- newline).  Kept apart from the message's hash, whose small fields Redis
-- then keeps in its compact encoding.
local function payload(m)
  local v = redis.call("GET", m .. ":p")
  local at = string.find(v, "\\n", 1, true)
  return cjson.decode(string.sub(v, 1, at - 1)), string.sub(v, at + 1)
end
local function head(m)
  return (payload(m))
end
local function dead_letter(B, m, id, terminal, lane, seq, reason, at)
  local h = head(m)             -- (kind, sender, ref, receipt: 5, 2, 3, 8)
  local n = redis.call("INCR", P .. ":dlseq")
  local enc = cjson.encode({id, terminal, tostring(lane), tostring(seq), h[5], reason, at,
                            h[2], h[3], h[8]})
  redis.call("ZADD", B .. ":dead", n, n .. "\\n" .. enc)
  redis.call("HINCRBY", B .. ":n", "dead", 1)
  return enc
end
"""

# ARGV[3] dedup window; ARGV[4] the items, a JSON array of [tenant,
# sender, ref, lane, created, expires, receipt, [recipients...], header
# length, body length] (every value a string but the recipients and the
# lengths); ARGV[5] each one's payload (see payload: header, newline,
# body), one after the other.
# Answer: per item {msg_id, duplicate, seq per recipient...}.
#
# Redis runs a script's commands in microseconds each, most of it the call
# itself: the fewer per message, the more messages per second.  So: the
# dedup entries of the whole batch are read with one HMGET per tenant; the
# duplicates (of a stored message within the window, or of an earlier item
# of this batch) are found before any write, so every new msg_id comes from
# one INCRBY; an inbox's last seq moves once per batch (one HINCRBY),
# its entries added with one ZADD; the expiry index, the dedup entries,
# the counters and the tenants set are written once per tenant.  What is
# left per message is its own HSET.
ACCEPT = _HEADER + """
local window = tonumber(ARGV[3])
local bodies, at = ARGV[5], 1
local items, per_base = cjson.decode(ARGV[4]), {}
for k = 1, #items do
  local e = items[k]
  local tenant, ref = e[1], e[3]
  local B = base(tenant)
  local hsize, size = e[9], e[10]
  local it = {e = e, n = #e[8], tenant = tenant, B = B, size = size,
              payload = string.sub(bodies, at, at + hsize + size)}
  at = at + hsize + 1 + size
  local pb = per_base[B]
  if not pb then
    pb = {keys = {}, asked = {}, seen = {}, exp = {}, dd = {}, ddt = {}, sum = {0, 0, 0},
          in_batch = {}}
    per_base[B] = pb
  end
  if ref ~= "0" then
    local dkey = e[2] .. "\\n" .. ref
    it.dkey = dkey
    if not pb.asked[dkey] then
      pb.asked[dkey] = true
      pb.keys[#pb.keys + 1] = dkey
    end
  end
  items[k] = it
end
for B, pb in pairs(per_base) do
  local keys = pb.keys
  for k = 1, #keys, 1000 do
    local found = redis.call("HMGET", B .. ":dd", unpack(keys, k, math.min(k + 999, #keys)))
    for j = 1, #found do
      if found[j] then pb.seen[keys[k + j - 1]] = found[j] end
    end
  end
end
local fresh = 0
for k = 1, #items do
  local it = items[k]
  local dkey = it.dkey
  if dkey then
    local pb = per_base[it.B]
    local prior = pb.in_batch[dkey]
    if prior then
      if tonumber(it.e[5]) - prior.at <= window then it.dup_of = prior.it end
    else
      local seen = pb.seen[dkey]
      if seen and tonumber(it.e[5]) - tonumber(redis.call("ZSCORE", it.B .. ":ddt", dkey))
          <= window then
        it.original = seen
      end
    end
    if not it.dup_of and not it.original then
      pb.in_batch[dkey] = {it = it, at = tonumber(it.e[5])}
    end
  end
  if not it.dup_of and not it.original then fresh = fresh + 1 end
end
local id = 0
if fresh > 0 then id = redis.call("INCRBY", P .. ":msgid", fresh) - fresh end
-- Each inbox's new entries are counted first, so its last seq moves with
-- one HINCRBY for the batch.
local inboxes, order = {}, {}
for k = 1, #items do
  local it = items[k]
  if not it.dup_of and not it.original then
    local lane, rcpts, qs = it.e[4], it.e[8], {}
    for i = 1, it.n do
      local t = rcpts[i]
      local q = it.B .. ":q:" .. lane .. ":" .. t
      local inbox = inboxes[q]
      if not inbox then
        -- (The node expands addresses within the tenant; the contract lets a
        -- recipient be of another one, whose keys hold its inbox.)
        local tt = tenant_of(t)
        if tt ~= it.tenant then q = base(tt) .. ":q:" .. lane .. ":" .. t end
        inbox = inboxes[q]
        if not inbox then
          inbox = {pos = base(tt) .. ":pos:" .. t, field = LANE[lane].l, count = 0,
                   entries = {}, tenant = tt}
          inboxes[q] = inbox
          order[#order + 1] = q
        end
      end
      inbox.count = inbox.count + 1
      qs[i] = inbox
    end
    it.qs = qs
  end
end
for k = 1, #order do
  local inbox = inboxes[order[k]]
  inbox.seq = redis.call("HINCRBY", inbox.pos, inbox.field, inbox.count) - inbox.count
end
local tenants, out, payloads = {}, {}, {}
for k = 1, #items do
  local it = items[k]
  if it.original then
    out[k] = {tonumber(it.original), 1}
  elseif it.dup_of then
    out[k] = {it.dup_of.id, 1}
  else
    id = id + 1
    it.id = id
    local sid = tostring(id)           -- (formatted once, not at each use)
    local e, n, B, tenant = it.e, it.n, it.B, it.tenant
    local pb = per_base[B]
    local expires, rcpts = e[6], e[8]
    local flags = ":"
    if e[7] == "1" then flags = ":r" end
    if n == 1 then flags = flags .. "1" end
    local m = B .. ":m:" .. sid
    local ns = digits[n]
    local fields = {"expires", expires, "n", ns, "open", ns, "done", "0", "bl", digits[it.size]}
    payloads[#payloads + 1] = m .. ":p"
    payloads[#payloads + 1] = it.payload
    local answer = {id, 0}
    local member_tail = ":" .. tenant .. flags
    local qs = it.qs
    local f = 10
    for i = 1, n do
      local inbox = qs[i]
      local F = FIELDS[i]
      local seq = inbox.seq + 1
      inbox.seq = seq
      local sseq = tostring(seq)
      local entries = inbox.entries
      entries[#entries + 1] = sseq
      entries[#entries + 1] = sid .. ":" .. F.i .. member_tail
      fields[f + 1], fields[f + 2], fields[f + 3] = F.t, rcpts[i], F.q
      fields[f + 4], fields[f + 5], fields[f + 6] = sseq, F.s, "stored"
      f = f + 6
      if f > 6000 then                 -- (unpack's bound on a group of thousands)
        redis.call("HSET", m, unpack(fields))
        fields, f = {}, 0
      end
      answer[i + 2] = seq
    end
    if f > 0 then redis.call("HSET", m, unpack(fields)) end
    if n > 0 then
      pb.exp[#pb.exp + 1] = expires
      pb.exp[#pb.exp + 1] = sid
    else
      redis.call("ZADD", B .. ":done", 0, sid)
    end
    local sum = pb.sum
    sum[1], sum[2], sum[3] = sum[1] + 1, sum[2] + n, sum[3] + it.size
    tenants[tenant] = true
    if it.dkey then
      pb.dd[#pb.dd + 1] = it.dkey
      pb.dd[#pb.dd + 1] = sid
      pb.ddt[#pb.ddt + 1] = e[5]
      pb.ddt[#pb.ddt + 1] = it.dkey
    end
    out[k] = answer
  end
end
bulk("MSET", nil, payloads)
for k = 1, #order do
  local q = order[k]
  local inbox = inboxes[q]
  tenants[inbox.tenant] = true
  bulk("ZADD", q, inbox.entries)
end
for B, pb in pairs(per_base) do
  bulk("ZADD", B .. ":exp", pb.exp)
  bulk("HSET", B .. ":dd", pb.dd)
  bulk("ZADD", B .. ":ddt", pb.ddt)
  local sum = pb.sum
  if sum[1] > 0 then
    redis.call("HINCRBY", B .. ":n", "messages", sum[1])
    redis.call("HINCRBY", B .. ":n", "unacked", sum[2])
    redis.call("HINCRBY", B .. ":n", "bytes", sum[3])
  end
end
for tenant in pairs(tenants) do redis.call("SADD", P .. ":tenants", tenant) end
return {epoch, out}
"""

# ARGV[3] terminal, ARGV[4] lane, ARGV[5] after, ARGV[6] limit.
# Answer: per entry {seq, msg_id, payload, delivered, expires}
# (delivered: the entry has a delivery time, see DELIVERED).
INBOX = _HEADER + """
local t, lane = ARGV[3], ARGV[4]
local B = base(tenant_of(t))
local out = {}
local found = redis.call("ZRANGEBYSCORE", B .. ":q:" .. lane .. ":" .. t, "(" .. ARGV[5], "+inf",
                         "WITHSCORES", "LIMIT", 0, tonumber(ARGV[6]))
for k = 1, #found, 2 do
  local id, i, MB = entry_of(found[k])
  local m = MB .. ":m:" .. id
  local f = redis.call("HMGET", m, "d" .. i, "expires")
  out[#out + 1] = {tonumber(found[k + 1]), tonumber(id), redis.call("GET", m .. ":p"),
                   f[1] and 1 or 0, f[2]}
end
return {epoch, out}
"""

# ARGV[3...] terminals.  Answer: each one's {acked P0, last P0, acked P1,
# last P1}.
POSITIONS_MANY = _HEADER + """
local out = {}
for a = 3, #ARGV do
  local t = ARGV[a]
  local f = redis.call("HMGET", base(tenant_of(t)) .. ":pos:" .. t, "a0", "l0", "a1", "l1")
  out[#out + 1] = {tonumber(f[1]) or 0, tonumber(f[2]) or 0, tonumber(f[3]) or 0,
                   tonumber(f[4]) or 0}
end
return {epoch, out}
"""

# ARGV[3] now; then (terminal, lane, seq) triples.  Answer: receipts
# {msg_id, terminal, sender, ref} of newly acked messages that asked for one
# (the entry's flags say which, without reading the message).
ACK = _HEADER + """
local now = ARGV[3]
local out, ends = {}, {}
for a = 4, #ARGV, 3 do
  local t, lane, arg = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local seq = tonumber(arg)
  local B = base(tenant_of(t))
  local pos = B .. ":pos:" .. t
  local L = LANE[lane]
  local f = redis.call("HMGET", pos, L.a, L.l)
  local acked, last = tonumber(f[1]) or 0, tonumber(f[2])
  if last and seq > acked then
    if seq > last then seq, arg = last, f[2] end
    local q = B .. ":q:" .. lane .. ":" .. t
    local found = redis.call("ZRANGEBYSCORE", q, "(" .. (f[1] or "0"), arg)
    for k = 1, #found do
      local id, i, MB, flags = entry_of(found[k])
      finish(ends, MB, id, i, flags, "acked", now, "")
      if string.find(flags, "r", 1, true) then
        local h = head(MB .. ":m:" .. id)
        out[#out + 1] = {tonumber(id), t, h[2], h[3]}
      end
    end
    if #found > 0 then redis.call("ZREMRANGEBYSCORE", q, "-inf", arg) end
    redis.call("HSET", pos, L.a, arg)
  end
end
flush_ends(ends)
return {epoch, out}
"""

# ARGV[3] now; then (terminal, lane, first, last) quadruples.  Answer: the
# receipts of first deliveries, as ACK's.  An entry is delivered once it has
# a delivery time ``d<i>`` (its state stays "stored" in the hash; TRACE's
# reader tells the two apart): one HSETNX per entry, which also says whether
# this is its first delivery.
DELIVERED = _HEADER + """
local now = ARGV[3]
local out = {}
for a = 4, #ARGV, 4 do
  local t, lane = ARGV[a], ARGV[a + 1]
  local q = base(tenant_of(t)) .. ":q:" .. lane .. ":" .. t
  local found = redis.call("ZRANGEBYSCORE", q, ARGV[a + 2], ARGV[a + 3])
  for k = 1, #found do
    local id, i, MB, flags = entry_of(found[k])
    local m = MB .. ":m:" .. id
    if redis.call("HSETNX", m, FIELDS[i].d, now) == 1 and string.find(flags, "r", 1, true) then
      local h = head(m)
      out[#out + 1] = {tonumber(id), t, h[2], h[3]}
    end
  end
end
return {epoch, out}
"""

# ARGV[3] terminal, ARGV[4] lane, ARGV[5] seq, ARGV[6] reason, ARGV[7] now.
# Answer: the dead letter (JSON) or false.
REJECT = _HEADER + """
local t, lane, seq = ARGV[3], ARGV[4], ARGV[5]
local B = base(tenant_of(t))
local q = B .. ":q:" .. lane .. ":" .. t
local found = redis.call("ZRANGEBYSCORE", q, seq, seq)
if #found == 0 then return {epoch, false} end
local id, i, MB, flags = entry_of(found[1])
local ends = {}
finish(ends, MB, id, i, flags, "rejected", ARGV[7], ARGV[6])
flush_ends(ends)
redis.call("ZREM", q, found[1])
return {epoch, dead_letter(B, MB .. ":m:" .. id, id, t, lane, seq, ARGV[6], ARGV[7])}
"""

# ARGV[3] now.  Every tenant's messages expired by now, in msg_id order;
# each open entry is dead-lettered.  Answer: the dead letters (JSON).
EXPIRE = _HEADER + """
local now = ARGV[3]
local due = {}
for _, tenant in ipairs(redis.call("SMEMBERS", P .. ":tenants")) do
  for _, id in ipairs(redis.call("ZRANGEBYSCORE", base(tenant) .. ":exp", "-inf", now)) do
    due[#due + 1] = {tonumber(id), tenant, id}
  end
end
table.sort(due, function(x, y) return x[1] < y[1] end)
local out = {}
for _, d in ipairs(due) do
  local id, B = d[3], base(d[2])      -- (the id as stored: tostring keeps 14 digits)
  local m = B .. ":m:" .. id
  local f = redis.call("HMGET", m, "n")
  local lane = head(m)[4]
  local ends = {}
  for i = 1, tonumber(f[1]) do
    local r = redis.call("HMGET", m, "s" .. i, "t" .. i, "q" .. i)
    if r[1] == "stored" or r[1] == "delivered" then
      local RB = base(tenant_of(r[2]))
      finish(ends, B, id, i, "", "expired", now, "ttl")
      redis.call("ZREMRANGEBYSCORE", RB .. ":q:" .. lane .. ":" .. r[2], r[3], r[3])
      out[#out + 1] = dead_letter(RB, m, id, r[2], lane, r[3], "ttl", now)
    end
  end
  flush_ends(ends)
end
return {epoch, out}
"""

# ARGV[3] terminal, ARGV[4] msg_id ("" = every one of the terminal's),
# ARGV[5] / ARGV[6] the expiry a redriven P0 / P1 entry gets at least,
# ARGV[7] limit.  The terminal's tenant's dead letters are read oldest
# first (one pass over them: an operator's call, not a hot path); each of
# the terminal's whose message is still held becomes recipient n+1 of its
# message (reason "redriven"), the next seq of its inbox, and leaves the
# dead letters.  Answer: per entry {msg_id, lane, dead seq, seq, kind, body,
# created, expires}.
REDRIVE = _HEADER + """
local t, want, limit = ARGV[3], ARGV[4], tonumber(ARGV[7])
local B = base(tenant_of(t))
local out = {}
if limit <= 0 then return {epoch, out} end
for _, member in ipairs(redis.call("ZRANGE", B .. ":dead", 0, -1)) do
  local d = cjson.decode(string.sub(member, string.find(member, "\\n", 1, true) + 1))
  if d[2] == t and (want == "" or d[1] == want) then
    local id, lane = d[1], d[3]
    -- The message lives under its own tenant (the recipient's, as the node
    -- routes within one tenant; else found as TRACE finds it).
    local MB, m = B, B .. ":m:" .. id
    if redis.call("EXISTS", m) == 0 then
      m = false
      for _, tenant in ipairs(redis.call("SMEMBERS", P .. ":tenants")) do
        if redis.call("EXISTS", base(tenant) .. ":m:" .. id) == 1 then
          MB = base(tenant)
          m = MB .. ":m:" .. id
          break
        end
      end
    end
    if m then
      local g = redis.call("HMGET", m, "n", "expires")
      local h, body = payload(m)      -- (tenant, kind, created, receipt: 1, 5, 7, 8)
      local n = tonumber(g[1]) + 1
      local seq = redis.call("HINCRBY", B .. ":pos:" .. t, "l" .. lane, 1)
      -- (flags: never "1", its message had a recipient before)
      local entry = id .. ":" .. n .. ":" .. h[1] .. (h[8] == "1" and ":r" or ":")
      redis.call("ZADD", B .. ":q:" .. lane .. ":" .. t, seq, entry)
      redis.call("HSET", m, "n", n, "t" .. n, t, "q" .. n, seq, "s" .. n, "stored",
                 "w" .. n, "redriven")
      local expires = g[2]
      local fresh = ARGV[5 + tonumber(lane)]
      if tonumber(fresh) > tonumber(expires) then
        expires = fresh
        redis.call("HSET", m, "expires", expires)
      end
      redis.call("HINCRBY", m, "open", 1)
      redis.call("ZREM", MB .. ":done", id)
      redis.call("ZADD", MB .. ":exp", expires, id)
      redis.call("HINCRBY", MB .. ":n", "unacked", 1)
      redis.call("ZREM", B .. ":dead", member)
      redis.call("HINCRBY", B .. ":n", "dead", -1)
      out[#out + 1] = {tonumber(id), tonumber(lane), tonumber(d[4]), seq, h[5], body, h[7],
                       expires}
      if #out >= limit then break end
    end
  end
end
return {epoch, out}
"""

# ARGV[3] msg_id.  Answer: {the message hash as a flat list, its payload},
# or false.
TRACE = _HEADER + """
for _, tenant in ipairs(redis.call("SMEMBERS", P .. ":tenants")) do
  local m = base(tenant) .. ":m:" .. ARGV[3]
  local found = redis.call("HGETALL", m)
  if #found > 0 then return {epoch, {found, redis.call("GET", m .. ":p")}} end
end
return {epoch, false}
"""

# ARGV[3] tenant ("" = every tenant), ARGV[4] limit.  Answer: the newest
# dead letters (JSON), newest first.
DEAD_LETTERS = _HEADER + """
local limit = tonumber(ARGV[4])
if limit <= 0 then return {epoch, {}} end
local tenants = {ARGV[3]}
if ARGV[3] == "" then tenants = redis.call("SMEMBERS", P .. ":tenants") end
local all = {}
for _, tenant in ipairs(tenants) do
  local got = redis.call("ZREVRANGE", base(tenant) .. ":dead", 0, limit - 1, "WITHSCORES")
  for k = 1, #got, 2 do all[#all + 1] = {tonumber(got[k + 1]), got[k]} end
end
table.sort(all, function(x, y) return x[1] > y[1] end)
local out = {}
for k = 1, math.min(limit, #all) do
  local member = all[k][2]
  out[k] = string.sub(member, string.find(member, "\\n", 1, true) + 1)
end
return {epoch, out}
"""

# ARGV[3] now, ARGV[4] cutoff (now - keep_acked), ARGV[5] dedup window.
# Deletes messages done by the cutoff and dedup entries past the window.
# Answer: how many messages went.
TRIM = _HEADER + """
local now, window = tonumber(ARGV[3]), tonumber(ARGV[5])
local removed = 0
for _, tenant in ipairs(redis.call("SMEMBERS", P .. ":tenants")) do
  local B = base(tenant)
  for _, id in ipairs(redis.call("ZRANGEBYSCORE", B .. ":done", "-inf", ARGV[4])) do
    local m = B .. ":m:" .. id
    -- (0 - n, not -n: Lua writes minus zero as "-0", which HINCRBY refuses)
    redis.call("HINCRBY", B .. ":n", "bytes", 0 - tonumber(redis.call("HGET", m, "bl")))
    redis.call("HINCRBY", B .. ":n", "messages", -1)
    redis.call("DEL", m, m .. ":p")
    redis.call("ZREM", B .. ":done", id)
    removed = removed + 1
  end
  -- Candidates by score (one second of slack), then the exact test the
  -- memory store makes (now - created > window) on each.
  local old = redis.call("ZRANGEBYSCORE", B .. ":ddt", "-inf", now - window + 1, "WITHSCORES")
  for k = 1, #old, 2 do
    if now - tonumber(old[k + 1]) > window then
      redis.call("HDEL", B .. ":dd", old[k])
      redis.call("ZREM", B .. ":ddt", old[k])
    end
  end
end
return {epoch, removed}
"""

# Answer: {messages, unacked, dead letters, bytes} summed over tenants.
STATS = _HEADER + """
local sums = {0, 0, 0, 0}
for _, tenant in ipairs(redis.call("SMEMBERS", P .. ":tenants")) do
  local f = redis.call("HMGET", base(tenant) .. ":n", "messages", "unacked", "dead", "bytes")
  for k = 1, 4 do sums[k] = sums[k] + (tonumber(f[k]) or 0) end
end
return {epoch, sums}
"""

# Nothing but the header: what :meth:`RedisStore.open` runs.
EPOCH = _HEADER + """
return {epoch, 0}
"""
