-- Takes up to ARGV[1] messages waiting in lists, from their heads, into a purge step,
-- and returns how many ids it took followed by (list's index in KEYS, id, body) for each
-- that had a body (dramaturg queue purge calls it until the lists are empty, so that no
-- single call blocks Redis for long).
-- The bodies are not dropped but moved into the step, a hash that outlives the purge:
-- the purge deletes it once the tasks' records and batch ends are written
-- (queue_purge_done.lua), or gives it back to the lists when they cannot be
-- (queue_give_back.lua); a step its purge left behind (killed midway) is finished by
-- another process, found in the sorted set of steps (queue_purge_claim.lua).
-- Only ids still in a list go: a claimed (running) message's id is in its worker's claim
-- set, not in the list, so its body stays. Each call is atomic, so a worker's fetch
-- (fetch.lua) takes an id either before (it runs) or never (it is purged).
-- KEYS: the sorted set of steps, this step's hash, then pairs of (list, bodies hash).
-- ARGV: the most ids to take, the step's name, the queue, the purge's token.
-- The step's hash: queue, owner (a token), taken_at (ms, Redis's clock: the age a step is
-- taken over at is then measured on one clock, whichever hosts purge and finish), and
-- "m:<id>" -> body.
local left = tonumber(ARGV[1])
local taken = 0
local kept = 0
local found = {0}
for i = 3, #KEYS, 2 do
    if left <= 0 then
        break
    end
    local ids = redis.call("lrange", KEYS[i], 0, left - 1)
    if #ids > 0 then
        redis.call("ltrim", KEYS[i], #ids, -1)
        for first = 1, #ids, 1000 do
            local chunk = {unpack(ids, first, math.min(first + 999, #ids))}
            local bodies = redis.call("hmget", KEYS[i + 1], unpack(chunk))
            redis.call("hdel", KEYS[i + 1], unpack(chunk))
            local fields = {}
            for k = 1, #chunk do
                if bodies[k] then
                    found[#found + 1] = i
                    found[#found + 1] = chunk[k]
                    found[#found + 1] = bodies[k]
                    fields[#fields + 1] = "m:" .. chunk[k]
                    fields[#fields + 1] = bodies[k]
                end
            end
            if #fields > 0 then
                redis.call("hset", KEYS[2], unpack(fields))
                kept = kept + #fields / 2
            end
        end
        taken = taken + #ids
        left = left - #ids
    end
end
if kept > 0 then
    local time = redis.call("time")
    local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
    redis.call("hset", KEYS[2], "queue", ARGV[3], "owner", ARGV[4], "taken_at", now)
    redis.call("zadd", KEYS[1], now, ARGV[2])
end
found[1] = taken
return found
