"""shared/cache"""
