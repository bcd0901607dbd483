-- Read only: one page of a queue's held tasks, those whose kicker's lease ran out after
-- them (they are held again for every purpose but have not been given back yet).
-- ARGV: now, offset, limit. Returns the total, then id, entry, id, entry...
local held = redis.call("zcard", KEYS[2])
local stale = redis.call("zcount", KEYS[4], "-inf", ARGV[1])
local offset, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local found = {held + stale}
local function add(hash, ids)
    for _, id in ipairs(ids) do
        local task = redis.call("hget", hash, id)
        if task then
            found[#found + 1] = id
            found[#found + 1] = task
        end
    end
end
if limit > 0 and offset < held then
    add(KEYS[1], redis.call("zrange", KEYS[2], offset, offset + limit - 1))
end
local room = limit - math.floor((#found - 1) / 2)
if room > 0 and stale > 0 and offset + limit > held then
    local skip = math.max(offset - held, 0)
    add(KEYS[3], redis.call("zrangebyscore", KEYS[4], "-inf", ARGV[1], "LIMIT", skip, room))
end
return found
