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
local function tenant_of(address)
  local _, _, t = string.find(address, "^[^:]*:([^/]*)")
  return t or ""
end
local function base(tenant)
  return P .. ":{" .. tenant .. "}:s"
end
-- An inbox entry's member: msg_id, recipient index, the message's tenant.
local function entry_of(member)
  local _, _, id, i, tenant = string.find(member, "^(%d+):(%d+):(.*)$")
  return id, i, base(tenant)
end
-- A recipient's entry ends (acked, rejected, expired): one less open entry
-- of its message; the message is done once none is open, at the latest end.
-- B is the message's tenant's base.
local function finish(B, m, id, i, state, at, reason)
  redis.call("HSET", m, "s" .. i, state)
  if state == "acked" then
    redis.call("HSET", m, "a" .. i, at)
  else
    redis.call("HSET", m, "e" .. i, at, "w" .. i, reason)
  end
  local open = redis.call("HINCRBY", m, "open", -1)
  local done = redis.call("HGET", m, "done")
  if tonumber(at) > tonumber(done) then
    redis.call("HSET", m, "done", at)
    done = at
  end
  redis.call("HINCRBY", B .. ":n", "unacked", -1)
  if open <= 0 then
    redis.call("ZREM", B .. ":exp", id)
    redis.call("ZADD", B .. ":done", done, id)
  end
end
local function dead_letter(B, m, id, terminal, lane, seq, reason, at)
  local f = redis.call("HMGET", m, "kind", "sender", "ref", "receipt")
  local n = redis.call("INCR", P .. ":dlseq")
  local enc = cjson.encode({id, terminal, tostring(lane), tostring(seq), f[1], reason, at,
                            f[2], f[3], f[4]})
  redis.call("ZADD", B .. ":dead", n, n .. "\\n" .. enc)
  redis.call("HINCRBY", B .. ":n", "dead", 1)
  return enc
end
"""

# ARGV[3] dedup window; ARGV[4] item count; then per item: tenant, sender,
# ref, lane, kind, to, body, created, expires, receipt, n, n recipients.
# Answer: per item {msg_id, duplicate, seq per recipient...}.
#
# Two passes: the first finds the duplicates (of a stored message within
# the window, or of an earlier item of this batch), so the second takes
# every new msg_id with one INCRBY; counters and the tenants set are
# written once per batch.  (Redis runs a script's commands in microseconds
# each: the fewer per message, the more messages per script.)
ACCEPT = _HEADER + """
local window = tonumber(ARGV[3])
local items, fresh, in_batch = {}, 0, {}
local a = 5
for k = 1, tonumber(ARGV[4]) do
  local tenant, ref, created = ARGV[a], ARGV[a + 2], tonumber(ARGV[a + 7])
  local n = tonumber(ARGV[a + 10])
  local it = {a = a, n = n, tenant = tenant, B = base(tenant)}
  if ref ~= "0" then
    it.dkey = ARGV[a + 1] .. "\\n" .. ref
    local key = tenant .. "\\n" .. it.dkey
    local prior = in_batch[key]
    if prior then
      if created - prior.at <= window then it.dup_of = prior.it end
    else
      local seen = redis.call("HGET", it.B .. ":dd", it.dkey)
      if seen and created - tonumber(redis.call("ZSCORE", it.B .. ":ddt", it.dkey)) <= window then
        it.original = seen
      end
    end
    if not it.dup_of and not it.original then in_batch[key] = {it = it, at = created} end
  end
  if not it.dup_of and not it.original then fresh = fresh + 1 end
  items[k] = it
  a = a + 11 + n
end
local id = 0
if fresh > 0 then id = redis.call("INCRBY", P .. ":msgid", fresh) - fresh end
local sums, tenants, out = {}, {}, {}
for k, it in ipairs(items) do
  if it.original then
    out[k] = {tonumber(it.original), 1}
  elseif it.dup_of then
    out[k] = {it.dup_of.id, 1}
  else
    id = id + 1
    it.id = id
    local a, n, B, tenant = it.a, it.n, it.B, it.tenant
    local lane, body, expires = ARGV[a + 3], ARGV[a + 6], ARGV[a + 8]
    local m = B .. ":m:" .. id
    local fields = {"tenant", tenant, "sender", ARGV[a + 1], "ref", ARGV[a + 2], "lane", lane,
                    "kind", ARGV[a + 4], "to", ARGV[a + 5], "body", body,
                    "created", ARGV[a + 7], "expires", expires, "receipt", ARGV[a + 9],
                    "n", n, "open", n, "done", "0"}
    local answer = {id, 0}
    for i = 1, n do
      local t = ARGV[a + 10 + i]
      -- (The node expands addresses within the tenant; the contract lets a
      -- recipient be of another one, whose keys hold its inbox.)
      local tt = tenant_of(t)
      local tb = base(tt)
      tenants[tt] = true
      local seq = redis.call("HINCRBY", tb .. ":pos:" .. t, "l" .. lane, 1)
      redis.call("ZADD", tb .. ":q:" .. lane .. ":" .. t, seq, id .. ":" .. i .. ":" .. tenant)
      local f = #fields
      fields[f + 1], fields[f + 2], fields[f + 3] = "t" .. i, t, "q" .. i
      fields[f + 4], fields[f + 5], fields[f + 6] = seq, "s" .. i, "stored"
      if f > 6000 then                 -- (unpack's bound on a group of thousands)
        redis.call("HSET", m, unpack(fields))
        fields = {}
      end
      answer[i + 2] = seq
    end
    if #fields > 0 then redis.call("HSET", m, unpack(fields)) end
    if n > 0 then
      redis.call("ZADD", B .. ":exp", expires, id)
    else
      redis.call("ZADD", B .. ":done", 0, id)
    end
    local sum = sums[B]
    if not sum then
      sum = {0, 0, 0}
      sums[B] = sum
    end
    sum[1], sum[2], sum[3] = sum[1] + 1, sum[2] + n, sum[3] + #body
    tenants[tenant] = true
    if it.dkey then
      redis.call("HSET", B .. ":dd", it.dkey, id)
      redis.call("ZADD", B .. ":ddt", ARGV[a + 7], it.dkey)
    end
    out[k] = answer
  end
end
for B, sum in pairs(sums) do
  redis.call("HINCRBY", B .. ":n", "messages", sum[1])
  redis.call("HINCRBY", B .. ":n", "unacked", sum[2])
  redis.call("HINCRBY", B .. ":n", "bytes", sum[3])
end
for tenant in pairs(tenants) do redis.call("SADD", P .. ":tenants", tenant) end
return {epoch, out}
"""

# ARGV[3] terminal, ARGV[4] lane, ARGV[5] after, ARGV[6] limit.
# Answer: per entry {seq, msg_id, kind, body, delivered, expires, created}.
INBOX = _HEADER + """
local t, lane = ARGV[3], ARGV[4]
local B = base(tenant_of(t))
local out = {}
local found = redis.call("ZRANGEBYSCORE", B .. ":q:" .. lane .. ":" .. t, "(" .. ARGV[5], "+inf",
                         "WITHSCORES", "LIMIT", 0, tonumber(ARGV[6]))
for k = 1, #found, 2 do
  local id, i, MB = entry_of(found[k])
  local f = redis.call("HMGET", MB .. ":m:" .. id, "kind", "body", "s" .. i, "expires",
                       "created")
  out[#out + 1] = {tonumber(found[k + 1]), tonumber(id), f[1], f[2],
                   f[3] == "delivered" and 1 or 0, f[4], f[5]}
end
return {epoch, out}
"""

# ARGV[3] terminal.  Answer: {acked P0, last P0, acked P1, last P1}.
POSITIONS = _HEADER + """
local t = ARGV[3]
local f = redis.call("HMGET", base(tenant_of(t)) .. ":pos:" .. t, "a0", "l0", "a1", "l1")
return {epoch, {tonumber(f[1]) or 0, tonumber(f[2]) or 0, tonumber(f[3]) or 0,
                tonumber(f[4]) or 0}}
"""

# ARGV[3] now; then (terminal, lane, seq) triples.  Answer: receipts
# {msg_id, terminal, sender, ref} of newly acked messages that asked for one.
ACK = _HEADER + """
local now = ARGV[3]
local out = {}
for a = 4, #ARGV, 3 do
  local t, lane, seq = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  local B = base(tenant_of(t))
  local pos = B .. ":pos:" .. t
  local f = redis.call("HMGET", pos, "a" .. lane, "l" .. lane)
  local acked, last = tonumber(f[1]) or 0, tonumber(f[2])
  if last and seq > acked then
    if seq > last then seq = last end
    local q = B .. ":q:" .. lane .. ":" .. t
    for _, member in ipairs(redis.call("ZRANGEBYSCORE", q, "(" .. acked, seq)) do
      local id, i, MB = entry_of(member)
      local m = MB .. ":m:" .. id
      finish(MB, m, id, i, "acked", now, "")
      local r = redis.call("HMGET", m, "receipt", "sender", "ref")
      if r[1] == "1" then out[#out + 1] = {tonumber(id), t, r[2], r[3]} end
    end
    redis.call("ZREMRANGEBYSCORE", q, "-inf", seq)
    redis.call("HSET", pos, "a" .. lane, seq)
  end
end
return {epoch, out}
"""

# ARGV[3] now; then (terminal, lane, first, last) quadruples.  Answer: the
# receipts of first deliveries, as ACK's.
DELIVERED = _HEADER + """
local now = ARGV[3]
local out = {}
for a = 4, #ARGV, 4 do
  local t, lane = ARGV[a], ARGV[a + 1]
  local B = base(tenant_of(t))
  local q = B .. ":q:" .. lane .. ":" .. t
  for _, member in ipairs(redis.call("ZRANGEBYSCORE", q, ARGV[a + 2], ARGV[a + 3])) do
    local id, i, MB = entry_of(member)
    local m = MB .. ":m:" .. id
    if redis.call("HGET", m, "s" .. i) == "stored" then
      redis.call("HSET", m, "s" .. i, "delivered", "d" .. i, now)
      local r = redis.call("HMGET", m, "receipt", "sender", "ref")
      if r[1] == "1" then out[#out + 1] = {tonumber(id), t, r[2], r[3]} end
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
local id, i, MB = entry_of(found[1])
local m = MB .. ":m:" .. id
finish(MB, m, id, i, "rejected", ARGV[7], ARGV[6])
redis.call("ZREM", q, found[1])
return {epoch, dead_letter(B, m, id, t, lane, seq, ARGV[6], ARGV[7])}
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
  local f = redis.call("HMGET", m, "n", "lane")
  local lane = f[2]
  for i = 1, tonumber(f[1]) do
    local r = redis.call("HMGET", m, "s" .. i, "t" .. i, "q" .. i)
    if r[1] == "stored" or r[1] == "delivered" then
      local RB = base(tenant_of(r[2]))
      finish(B, m, id, i, "expired", now, "ttl")
      redis.call("ZREM", RB .. ":q:" .. lane .. ":" .. r[2], id .. ":" .. i .. ":" .. d[2])
      out[#out + 1] = dead_letter(RB, m, id, r[2], lane, r[3], "ttl", now)
    end
  end
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
      local f = redis.call("HMGET", m, "n", "expires", "kind", "body", "created", "tenant")
      local n = tonumber(f[1]) + 1
      local seq = redis.call("HINCRBY", B .. ":pos:" .. t, "l" .. lane, 1)
      redis.call("ZADD", B .. ":q:" .. lane .. ":" .. t, seq, id .. ":" .. n .. ":" .. f[6])
      redis.call("HSET", m, "n", n, "t" .. n, t, "q" .. n, seq, "s" .. n, "stored",
                 "w" .. n, "redriven")
      local expires = f[2]
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
      out[#out + 1] = {tonumber(id), tonumber(lane), tonumber(d[4]), seq, f[3], f[4], f[5],
                       expires}
      if #out >= limit then break end
    end
  end
end
return {epoch, out}
"""

# ARGV[3] msg_id.  Answer: the message hash as a flat list, or false.
TRACE = _HEADER + """
for _, tenant in ipairs(redis.call("SMEMBERS", P .. ":tenants")) do
  local found = redis.call("HGETALL", base(tenant) .. ":m:" .. ARGV[3])
  if #found > 0 then return {epoch, found} end
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
    redis.call("HINCRBY", B .. ":n", "bytes", -redis.call("HSTRLEN", m, "body"))
    redis.call("HINCRBY", B .. ":n", "messages", -1)
    redis.call("DEL", m)
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
