-- The functions the held store's scripts share; each script that calls one is run with
-- this file in front of it (see held.py).
--
-- Keys, under <namespace>:__held__ (see held.py), the same five as KEYS[1..5] in every
-- script: <q>, <q>#order, <q>#kicking, <q>#kicking-order, <q>#kicking-token.

-- The time a held task was held at, for its listing place; an entry that does not
-- decode (which must not fail the script) goes last.
local function held_at(task, fallback)
    local ok, decoded = pcall(cjson.decode, task)
    if ok and type(decoded) == "table" and type(decoded["held_at"]) == "number" then
        return decoded["held_at"]
    end
    return fallback
end

-- A taken task back in the held hash, in its listing place.
local function give_back(id, now)
    local task = redis.call("hget", KEYS[3], id)
    redis.call("hdel", KEYS[3], id)
    redis.call("zrem", KEYS[4], id)
    redis.call("hdel", KEYS[5], id)
    if task then
        redis.call("hset", KEYS[1], id, task)
        redis.call("zadd", KEYS[2], held_at(task, now), id)
    end
end

-- Gives back the tasks whose lease ran out (at or before now): every script that takes
-- or deletes held tasks runs this first, so none stays hidden for long. Each kicker sets
-- its own lease's length; the store only compares its end with now.
local function give_back_stale(now)
    for _, id in ipairs(redis.call("zrangebyscore", KEYS[4], "-inf", now)) do
        give_back(id, now)
    end
end
