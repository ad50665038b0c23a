//+------------------------------------------------------------------+
//| TcMt4Terminal.mqh - MetaTrader 4 side of CTcTerminal             |
//|                                                                  |
//| MT4 has no trade-transaction event, so master events come from a |
//| scan of the trade pool (OrdersTotal/OrderSelect) diffed against  |
//| the previous scan (CTcMt4Terminal::Scan). The EA scans on every  |
//| tick and every 10-16 ms timer event; TradecopyLoop.mq4 scans in  |
//| its own tight loop.                                              |
//|                                                                  |
//| MT4 partial closes give the remainder a *new ticket*: the closed |
//| part keeps the old ticket in history (comment usually "to #new") |
//| and the remainder's comment becomes "from #old" - which also     |
//| wipes the copy comment "tc.<master>.<ref>". The scan reports     |
//| reduced with new_ticket, and a small alias file remembers which  |
//| copy comment each remainder inherited, so the follower mapping   |
//| survives partial closes and restarts.                            |
//+------------------------------------------------------------------+
#ifndef TC_MT4_TERMINAL_MQH
#define TC_MT4_TERMINAL_MQH

#include <Tradecopy\TcBridge.mqh>

#define TC_MT4_EPS 0.000000005

//+------------------------------------------------------------------+
//| MT4 trade errors as text (stdlib's ErrorDescription, without the |
//| stdlib.ex4 dependency).                                          |
//+------------------------------------------------------------------+
string TcMt4ErrorText(const int code)
  {
   switch(code)
     {
      case 0:    return "no error";
      case 1:    return "no error, trade conditions not changed";
      case 2:    return "common error";
      case 3:    return "invalid trade parameters";
      case 4:    return "trade server is busy";
      case 5:    return "old version of the client terminal";
      case 6:    return "no connection with trade server";
      case 7:    return "not enough rights";
      case 8:    return "too frequent requests";
      case 9:    return "malfunctional trade operation";
      case 64:   return "account disabled";
      case 65:   return "invalid account";
      case 128:  return "trade timeout";
      case 129:  return "invalid price";
      case 130:  return "invalid stops";
      case 131:  return "invalid trade volume";
      case 132:  return "market is closed";
      case 133:  return "trade is disabled";
      case 134:  return "not enough money";
      case 135:  return "price changed";
      case 136:  return "off quotes";
      case 137:  return "broker is busy";
      case 138:  return "requote";
      case 139:  return "order is locked";
      case 140:  return "buy orders only allowed";
      case 141:  return "too many requests";
      case 145:  return "modification denied because order is too close to market";
      case 146:  return "trade context is busy";
      case 147:  return "expirations are denied by broker";
      case 148:  return "the amount of open and pending orders has reached the limit";
      case 149:  return "hedging is prohibited";
      case 150:  return "prohibited by FIFO rules";
      case 4051: return "invalid function parameter value";
      case 4106: return "unknown symbol";
      case 4107: return "invalid price parameter for trade function";
      case 4108: return "invalid ticket";
      case 4109: return "trade is not allowed (enable AutoTrading and 'Allow live trading')";
      case 4110: return "longs are not allowed";
      case 4111: return "shorts are not allowed";
     }
   return "error " + IntegerToString(code);
  }
//--- nothing was traded: safe to try again with a fresh price
bool TcMt4Retryable(const int err)
  {
   return err == 4 || err == 8 || err == 129 || err == 135 || err == 136 || err == 137 || err == 138 || err == 146;
  }
//--- the outcome is unknown: look at the account before answering
bool TcMt4Unknown(const int err)
  {
   return err == 128 || err == 142 || err == 143;
  }

bool TcMt4IsMarket(const int type)  { return type == OP_BUY || type == OP_SELL; }
bool TcMt4IsPending(const int type) { return type >= OP_BUYLIMIT && type <= OP_SELLSTOP; }
string TcMt4Side(const int type)    { return (type == OP_BUY || type == OP_BUYLIMIT || type == OP_BUYSTOP) ? "buy" : "sell"; }

string TcMt4OrderTypeText(const int type)
  {
   switch(type)
     {
      case OP_BUYLIMIT:
         return "buy_limit";
      case OP_SELLLIMIT:
         return "sell_limit";
      case OP_BUYSTOP:
         return "buy_stop";
      case OP_SELLSTOP:
         return "sell_stop";
     }
   return "";
  }

int TcMt4OrderTypeFromProtocol(const int t)
  {
   switch(t)
     {
      case TC_OT_BUY_LIMIT:
         return OP_BUYLIMIT;
      case TC_OT_SELL_LIMIT:
         return OP_SELLLIMIT;
      case TC_OT_BUY_STOP:
         return OP_BUYSTOP;
     }
   return OP_SELLSTOP;
  }

//--- the ticket number right after marker in a comment ("from #123" -> 123), 0 if none
int TcTicketAfter(const string comment, const string marker)
  {
   int at = StringFind(comment, marker);
   if(at < 0)
      return 0;
   int i = at + StringLen(marker);
   int n = StringLen(comment);
   long v = 0;
   int digits = 0;
   while(i < n)
     {
      ushort c = StringGetCharacter(comment, i);
      if(c < '0' || c > '9')
         break;
      v = v * 10 + (c - '0');
      digits++;
      i++;
     }
   if(digits == 0 || v > 2147483647)
      return 0;
   return (int)v;
  }

//--- why MT4 closed an order: it appends "[sl]"/"[tp]" to the comment, stop-out writes "so:"
string TcMt4CloseReason(const string comment)
  {
   if(StringFind(comment, "[sl]") >= 0)
      return "sl";
   if(StringFind(comment, "[tp]") >= 0)
      return "tp";
   if(StringFind(comment, "so:") == 0 || StringFind(comment, "[so]") >= 0)
      return "stop_out";
   return "client";
  }

//+------------------------------------------------------------------+
//| One scan of the trade pool, sorted by ticket.                    |
//+------------------------------------------------------------------+
class CTcMt4Book
  {
public:
   int               ticket[];
   int               type[];
   double            lots[];
   string            sym[];
   double            open[];
   double            sl[];
   double            tp[];
   long              magic[];
   string            comment[];
   datetime          opened[];
   datetime          expiry[];
   int               n;

private:
   void              Resize(const int cap)
     {
      ArrayResize(ticket, cap);
      ArrayResize(type, cap);
      ArrayResize(lots, cap);
      ArrayResize(sym, cap);
      ArrayResize(open, cap);
      ArrayResize(sl, cap);
      ArrayResize(tp, cap);
      ArrayResize(magic, cap);
      ArrayResize(comment, cap);
      ArrayResize(opened, cap);
      ArrayResize(expiry, cap);
     }
   void              Move(const int dst, const int src)
     {
      ticket[dst] = ticket[src];
      type[dst] = type[src];
      lots[dst] = lots[src];
      sym[dst] = sym[src];
      open[dst] = open[src];
      sl[dst] = sl[src];
      tp[dst] = tp[src];
      magic[dst] = magic[src];
      comment[dst] = comment[src];
      opened[dst] = opened[src];
      expiry[dst] = expiry[src];
     }

public:
                     CTcMt4Book() : n(0) {}

   void              Load()
     {
      int total = OrdersTotal();
      Resize(total + 1);            // one spare slot for the sort
      n = 0;
      for(int i = 0; i < total; i++)
        {
         if(!OrderSelect(i, SELECT_BY_POS, MODE_TRADES))
            continue;
         int k = n++;
         ticket[k] = OrderTicket();
         type[k] = OrderType();
         lots[k] = OrderLots();
         sym[k] = OrderSymbol();
         open[k] = OrderOpenPrice();
         sl[k] = OrderStopLoss();
         tp[k] = OrderTakeProfit();
         magic[k] = OrderMagicNumber();
         comment[k] = OrderComment();
         opened[k] = OrderOpenTime();
         expiry[k] = OrderExpiration();
        }
      //--- insertion sort by ticket (the pool is usually close to sorted already)
      for(int i = 1; i < n; i++)
        {
         if(ticket[i - 1] <= ticket[i])
            continue;
         Move(n, i);
         int j = i - 1;
         while(j >= 0 && ticket[j] > ticket[n])
           {
            Move(j + 1, j);
            j--;
           }
         Move(j + 1, n);
        }
     }

   int               Find(const int t) const
     {
      int lo = 0, hi = n - 1;
      while(lo <= hi)
        {
         int mid = (lo + hi) / 2;
         if(ticket[mid] == t)
            return mid;
         if(ticket[mid] < t)
            lo = mid + 1;
         else
            hi = mid - 1;
        }
      return -1;
     }

   void              CopyFrom(CTcMt4Book &o)
     {
      n = o.n;
      Resize(n + 1);
      for(int i = 0; i < n; i++)
        {
         ticket[i] = o.ticket[i];
         type[i] = o.type[i];
         lots[i] = o.lots[i];
         sym[i] = o.sym[i];
         open[i] = o.open[i];
         sl[i] = o.sl[i];
         tp[i] = o.tp[i];
         magic[i] = o.magic[i];
         comment[i] = o.comment[i];
         opened[i] = o.opened[i];
         expiry[i] = o.expiry[i];
        }
     }
  };

//+------------------------------------------------------------------+
//| MT4 terminal adapter                                             |
//+------------------------------------------------------------------+
class CTcMt4Terminal : public CTcTerminal
  {
private:
   long              m_magic;
   int               m_deviation;
   string            m_symbolsCfg;
   int               m_recoverDays;
   bool              m_stopsAfterFill;
   CTcJournal        m_alias;      // remainder ticket -> inherited copy comment
   string            m_account;
   CTcMt4Book        m_prev;
   CTcMt4Book        m_cur;
   bool              m_scanned;

   long              Magic(CTcJsonObject &cmd) { long m = cmd.Int("magic"); return m != 0 ? m : m_magic; }
   int               Deviation(CTcJsonObject &cmd)
     {
      long d = cmd.Int("deviation_points");
      return d > 0 ? (int)d : m_deviation;
     }
   double            Norm(const string symbol, const double price)
     {
      if(price <= 0.0)
         return 0.0;
      return NormalizeDouble(price, (int)MarketInfo(symbol, MODE_DIGITS));
     }
   //--- MT4 allows one trade operation at a time per terminal
   bool              WaitTradeContext()
     {
      ulong start = TcNowMs();
      while(IsTradeContextBusy())
        {
         if(TcNowMs() - start > 5000)
            return false;
         Sleep(5);
        }
      RefreshRates();
      return true;
     }

   //--- the copy comment an open order carries: its own, or the one its remainder chain inherited
   string            EffectiveComment(const int ticket, const string raw)
     {
      if(TcIsCopyComment(raw))
         return raw;
      string a = m_alias.AliasOf(IntegerToString(ticket));
      if(a != "")
         return a;
      //--- "from #old": follow the chain through the alias file (bounded)
      int from = TcTicketAfter(raw, "from #");
      for(int depth = 0; from > 0 && depth < 16; depth++)
        {
         a = m_alias.AliasOf(IntegerToString(from));
         if(a != "")
            return a;
         if(!OrderSelect(from, SELECT_BY_TICKET))
            break;
         if(TcIsCopyComment(OrderComment()))
            return OrderComment();
         from = TcTicketAfter(OrderComment(), "from #");
        }
      return raw;
     }

   string            FindOpenByComment(const string symbol, const long magic, const string comment, const bool market)
     {
      for(int i = OrdersTotal() - 1; i >= 0; i--)
        {
         if(!OrderSelect(i, SELECT_BY_POS, MODE_TRADES))
            continue;
         if(market != TcMt4IsMarket(OrderType()))
            continue;
         if(OrderMagicNumber() != magic || (symbol != "" && OrderSymbol() != symbol))
            continue;
         int t = OrderTicket();   // EffectiveComment may select other orders
         if(EffectiveComment(t, OrderComment()) == comment)
            return IntegerToString(t);
        }
      return "";
     }

   //--- closed copies: MT4 may have appended "[sl]"/"[tp]" to the comment (TcCommentIsKey)
   string            FindHistoryByComment(const string symbol, const long magic, const string comment, const bool market_only)
     {
      datetime since = TimeCurrent() - m_recoverDays * 86400;
      for(int i = OrdersHistoryTotal() - 1; i >= 0; i--)
        {
         if(!OrderSelect(i, SELECT_BY_POS, MODE_HISTORY))
            continue;
         int type = OrderType();
         if(!TcMt4IsMarket(type) && (market_only || !TcMt4IsPending(type)))
            continue;   // balance/credit lines
         if(OrderOpenTime() < since || OrderMagicNumber() != magic || OrderSymbol() != symbol)
            continue;
         if(TcCommentIsKey(OrderComment(), comment))
            return IntegerToString(OrderTicket());
        }
      return "";
     }

   //--- after a partial close of `old`: the order that holds the rest
   string            FindRemainder(const int old, const string symbol, const int type, const long magic,
                                   const double open_price, const double lots)
     {
      double point = MarketInfo(symbol, MODE_POINT);
      string candidate = "";
      int found = 0;
      for(int i = OrdersTotal() - 1; i >= 0; i--)
        {
         if(!OrderSelect(i, SELECT_BY_POS, MODE_TRADES))
            continue;
         if(TcTicketAfter(OrderComment(), "from #") == old)
            return IntegerToString(OrderTicket());
         if(OrderTicket() > old && OrderSymbol() == symbol && OrderType() == type && OrderMagicNumber() == magic &&
            MathAbs(OrderOpenPrice() - open_price) < point / 2.0 && MathAbs(OrderLots() - lots) < TC_MT4_EPS)
           {
            candidate = IntegerToString(OrderTicket());
            found++;
           }
        }
      return found == 1 ? candidate : "";
     }

   //------------------------------------------------------------ execution
   string            Fail(const int err)
     {
      return TcResultTail(false, err, TcMt4ErrorText(err), "", 0.0, 0.0, TcUtcNowNs());
     }

   bool              EnsureQuotes(const string sym)
     {
      if(MarketInfo(sym, MODE_BID) > 0.0)
         return true;
      SymbolSelect(sym, true);
      RefreshRates();
      return MarketInfo(sym, MODE_BID) > 0.0;
     }

   string            DoOpen(CTcJsonObject &cmd)
     {
      string sym = cmd.Str("symbol");
      if(!EnsureQuotes(sym))
         return TcRefuseTail("ea: no quote for " + sym + " (unknown symbol?)");
      string side = cmd.Str("side");
      if(side != "buy" && side != "sell")
         return TcRefuseTail("ea: open needs side buy or sell");
      int type = (side == "buy") ? OP_BUY : OP_SELL;
      double lots = TcNormalizeVolume(sym, cmd.Num("volume"));
      if(lots <= 0.0)
         return TcRefuseTail("ea: open needs a positive volume");
      double sl = Norm(sym, cmd.Num("sl"));
      double tp = Norm(sym, cmd.Num("tp"));
      int dev = Deviation(cmd);
      int magic = (int)Magic(cmd);
      string comment = TcClipComment(cmd.Str("comment"));
      double want = cmd.Num("price");
      bool check_dev = (want > 0.0 && cmd.Int("deviation_points") > 0);
      double point = MarketInfo(sym, MODE_POINT);
      int digits = (int)MarketInfo(sym, MODE_DIGITS);
      int ticket = -1;
      int err = 0;
      for(int attempt = 0; attempt < 3; attempt++)
        {
         if(!WaitTradeContext())
           {
            err = 146;
            break;
           }
         double px = (type == OP_BUY) ? MarketInfo(sym, MODE_ASK) : MarketInfo(sym, MODE_BID);
         if(check_dev && MathAbs(px - want) > dev * point + point / 2.0)
            return TcRefuseTail(StringFormat("ea: price deviation: %s %s, requested %s, limit %d points",
                                             type == OP_BUY ? "ask" : "bid", DoubleToString(px, digits),
                                             DoubleToString(want, digits), dev));
         ResetLastError();
         ticket = OrderSend(sym, type, lots, px, dev, m_stopsAfterFill ? 0.0 : sl, m_stopsAfterFill ? 0.0 : tp,
                            comment, magic, 0, clrNONE);
         if(ticket >= 0)
            break;
         err = GetLastError();
         if(!TcMt4Retryable(err))
            break;
         Sleep(20 * (attempt + 1));
        }
      if(ticket < 0 && TcMt4Unknown(err))
        {
         //--- timed out: it may still have been filled
         string t = FindOpenByComment(sym, magic, comment, true);
         if(t != "")
            ticket = (int)StringToInteger(t);
        }
      if(ticket < 0)
         return Fail(err);
      string note = "done";
      if(m_stopsAfterFill && (sl > 0.0 || tp > 0.0) && OrderSelect(ticket, SELECT_BY_TICKET))
        {
         //--- Market-execution (ECN) accounts: levels after the fill
         if(!OrderModify(ticket, OrderOpenPrice(), sl, tp, 0, clrNONE))
            note = "opened, but SL/TP not set: " + TcMt4ErrorText(GetLastError());
        }
      double price = 0.0, got = lots;
      long time_ns = TcUtcNowNs();
      if(OrderSelect(ticket, SELECT_BY_TICKET))
        {
         price = OrderOpenPrice();
         got = OrderLots();
         time_ns = TcServerToUtcNs(OrderOpenTime());
        }
      return TcResultTail(true, 0, note, IntegerToString(ticket), price, got, time_ns);
     }

   string            DoClose(CTcJsonObject &cmd, const string ticket)
     {
      int t = (int)StringToInteger(ticket);
      if(t <= 0 || !OrderSelect(t, SELECT_BY_TICKET) || OrderCloseTime() != 0 || !TcMt4IsMarket(OrderType()))
         return TcRefuseTail("ea: position " + ticket + " not found (already closed?)");
      string sym = OrderSymbol();
      int type = OrderType();
      double have = OrderLots();
      long magic = OrderMagicNumber();
      double open_price = OrderOpenPrice();
      string effective = EffectiveComment(t, OrderComment());   // before the comment changes
      double lots = cmd.Num("volume");
      lots = (lots <= 0.0) ? have : MathMin(TcNormalizeVolume(sym, lots), have);
      int dev = Deviation(cmd);
      bool ok = false;
      int err = 0;
      for(int attempt = 0; attempt < 3; attempt++)
        {
         if(!WaitTradeContext())
           {
            err = 146;
            break;
           }
         double px = (type == OP_BUY) ? MarketInfo(sym, MODE_BID) : MarketInfo(sym, MODE_ASK);
         ResetLastError();
         if(OrderClose(t, lots, px, dev, clrNONE))
           {
            ok = true;
            break;
           }
         err = GetLastError();
         if(!TcMt4Retryable(err))
            break;
         Sleep(20 * (attempt + 1));
        }
      if(!ok && TcMt4Unknown(err) && OrderSelect(t, SELECT_BY_TICKET) && OrderCloseTime() > 0)
         ok = true;
      if(!ok)
         return Fail(err);
      double cprice = 0.0;
      long time_ns = TcUtcNowNs();
      if(OrderSelect(t, SELECT_BY_TICKET))
        {
         cprice = OrderClosePrice();
         time_ns = TcServerToUtcNs(OrderCloseTime());
        }
      string rest = "";
      if(lots < have - TC_MT4_EPS)
        {
         rest = FindRemainder(t, sym, type, magic, open_price, have - lots);
         if(rest != "" && TcIsCopyComment(effective))
            m_alias.Alias(rest, effective);
        }
      //--- ticket: where the position lives on (the remainder), or the ticket that was closed
      return TcResultTail(true, 0, rest != "" ? "partially closed, remainder #" + rest : "closed",
                          rest != "" ? rest : ticket, cprice, lots, time_ns);
     }

   string            DoModify(CTcJsonObject &cmd, const string ticket)
     {
      int t = (int)StringToInteger(ticket);
      if(t <= 0 || !OrderSelect(t, SELECT_BY_TICKET) || OrderCloseTime() != 0 || !TcMt4IsMarket(OrderType()))
         return TcRefuseTail("ea: position " + ticket + " not found");
      string sym = OrderSymbol();
      double sl = Norm(sym, cmd.Num("sl"));
      double tp = Norm(sym, cmd.Num("tp"));
      double point = MarketInfo(sym, MODE_POINT);
      if(MathAbs(OrderStopLoss() - sl) < point / 2.0 && MathAbs(OrderTakeProfit() - tp) < point / 2.0)
         return TcResultTail(true, 1, "no changes: levels already set", ticket, 0.0, 0.0, TcUtcNowNs());
      bool ok = false;
      int err = 0;
      for(int attempt = 0; attempt < 3; attempt++)
        {
         if(!WaitTradeContext())
           {
            err = 146;
            break;
           }
         if(!OrderSelect(t, SELECT_BY_TICKET))
            break;
         ResetLastError();
         if(OrderModify(t, OrderOpenPrice(), sl, tp, OrderExpiration(), clrNONE))
           {
            ok = true;
            break;
           }
         err = GetLastError();
         if(err == 1)
           {
            ok = true;   // "no result": nothing to change
            break;
           }
         if(!TcMt4Retryable(err))
            break;
         Sleep(20 * (attempt + 1));
        }
      if(!ok)
         return Fail(err);
      return TcResultTail(true, err, "done", ticket, 0.0, 0.0, TcUtcNowNs());
     }

   string            DoCloseBy(CTcJsonObject &cmd, const string ticket)
     {
      int t = (int)StringToInteger(ticket);
      int o = (int)StringToInteger(cmd.Str("opposite_ticket"));
      if(t <= 0 || !OrderSelect(t, SELECT_BY_TICKET) || OrderCloseTime() != 0)
         return TcRefuseTail("ea: position " + ticket + " not found");
      double lt = OrderLots();
      int type_t = OrderType();
      string sym = OrderSymbol();
      long magic_t = OrderMagicNumber();
      double open_t = OrderOpenPrice();
      string eff_t = EffectiveComment(t, OrderComment());
      if(o <= 0 || !OrderSelect(o, SELECT_BY_TICKET) || OrderCloseTime() != 0)
         return TcRefuseTail("ea: opposite position " + cmd.Str("opposite_ticket") + " not found");
      double lo = OrderLots();
      int type_o = OrderType();
      long magic_o = OrderMagicNumber();
      double open_o = OrderOpenPrice();
      string eff_o = EffectiveComment(o, OrderComment());
      bool ok = false;
      int err = 0;
      for(int attempt = 0; attempt < 3; attempt++)
        {
         if(!WaitTradeContext())
           {
            err = 146;
            break;
           }
         ResetLastError();
         if(OrderCloseBy(t, o, clrNONE))
           {
            ok = true;
            break;
           }
         err = GetLastError();
         if(!TcMt4Retryable(err))
            break;
         Sleep(20 * (attempt + 1));
        }
      if(!ok && TcMt4Unknown(err) && OrderSelect(t, SELECT_BY_TICKET) && OrderCloseTime() > 0)
         ok = true;
      if(!ok)
         return Fail(err);
      //--- unequal volumes: MT4 reopens the difference under a new ticket
      string rest = "";
      if(MathAbs(lt - lo) > TC_MT4_EPS)
        {
         bool t_bigger = lt > lo;
         rest = FindRemainder(t_bigger ? t : o, sym, t_bigger ? type_t : type_o, t_bigger ? magic_t : magic_o,
                              t_bigger ? open_t : open_o, MathAbs(lt - lo));
         string eff = t_bigger ? eff_t : eff_o;
         if(rest != "" && TcIsCopyComment(eff))
            m_alias.Alias(rest, eff);
        }
      return TcResultTail(true, 0, rest != "" ? "closed by, remainder #" + rest : "closed by",
                          rest != "" ? rest : ticket, 0.0, MathMin(lt, lo), TcUtcNowNs());
     }

   string            DoPendingPlace(CTcJsonObject &cmd)
     {
      string sym = cmd.Str("symbol");
      if(!EnsureQuotes(sym))
         return TcRefuseTail("ea: no quote for " + sym + " (unknown symbol?)");
      int ot = TcOrderTypeFromText(cmd.Str("order_type"));
      if(ot == TC_OT_NONE)
         return TcRefuseTail("ea: pending_place needs order_type buy_limit/sell_limit/buy_stop/sell_stop");
      double lots = TcNormalizeVolume(sym, cmd.Num("volume"));
      double price = Norm(sym, cmd.Num("price"));
      if(lots <= 0.0 || price <= 0.0)
         return TcRefuseTail("ea: pending_place needs a positive volume and price");
      datetime expires = TcUtcNsToServer(cmd.Int("expiration"));
      string comment = TcClipComment(cmd.Str("comment"));
      int magic = (int)Magic(cmd);
      int ticket = -1;
      int err = 0;
      for(int attempt = 0; attempt < 3; attempt++)
        {
         if(!WaitTradeContext())
           {
            err = 146;
            break;
           }
         ResetLastError();
         ticket = OrderSend(sym, TcMt4OrderTypeFromProtocol(ot), lots, price, Deviation(cmd), Norm(sym, cmd.Num("sl")),
                            Norm(sym, cmd.Num("tp")), comment, magic, expires, clrNONE);
         if(ticket >= 0)
            break;
         err = GetLastError();
         if(!TcMt4Retryable(err))
            break;
         Sleep(20 * (attempt + 1));
        }
      if(ticket < 0 && TcMt4Unknown(err))
        {
         string t = FindOpenByComment(sym, magic, comment, false);
         if(t != "")
            ticket = (int)StringToInteger(t);
        }
      if(ticket < 0)
         return Fail(err);
      return TcResultTail(true, 0, "placed", IntegerToString(ticket), price, lots, TcUtcNowNs());
     }

   string            DoPendingModify(CTcJsonObject &cmd, const string ticket)
     {
      int t = (int)StringToInteger(ticket);
      if(t <= 0 || !OrderSelect(t, SELECT_BY_TICKET) || OrderCloseTime() != 0 || !TcMt4IsPending(OrderType()))
         return TcRefuseTail("ea: pending order " + ticket + " not found");
      string sym = OrderSymbol();
      double price = Norm(sym, cmd.Num("price"));
      if(price <= 0.0)
         price = OrderOpenPrice();
      double sl = Norm(sym, cmd.Num("sl"));
      double tp = Norm(sym, cmd.Num("tp"));
      datetime expires = TcUtcNsToServer(cmd.Int("expiration"));
      double point = MarketInfo(sym, MODE_POINT);
      if(MathAbs(OrderOpenPrice() - price) < point / 2.0 && MathAbs(OrderStopLoss() - sl) < point / 2.0 &&
         MathAbs(OrderTakeProfit() - tp) < point / 2.0 && OrderExpiration() == expires)
         return TcResultTail(true, 1, "no changes: order already matches", ticket, price, 0.0, TcUtcNowNs());
      bool ok = false;
      int err = 0;
      for(int attempt = 0; attempt < 3; attempt++)
        {
         if(!WaitTradeContext())
           {
            err = 146;
            break;
           }
         ResetLastError();
         if(OrderModify(t, price, sl, tp, expires, clrNONE))
           {
            ok = true;
            break;
           }
         err = GetLastError();
         if(err == 1)
           {
            ok = true;
            break;
           }
         if(!TcMt4Retryable(err))
            break;
         Sleep(20 * (attempt + 1));
        }
      if(!ok)
         return Fail(err);
      return TcResultTail(true, err, "done", ticket, price, 0.0, TcUtcNowNs());
     }

   string            DoPendingCancel(const string ticket)
     {
      int t = (int)StringToInteger(ticket);
      if(t <= 0 || !OrderSelect(t, SELECT_BY_TICKET) || OrderCloseTime() != 0 || !TcMt4IsPending(OrderType()))
         return TcRefuseTail("ea: pending order " + ticket + " not found (filled, expired or cancelled?)");
      bool ok = false;
      int err = 0;
      for(int attempt = 0; attempt < 3; attempt++)
        {
         if(!WaitTradeContext())
           {
            err = 146;
            break;
           }
         ResetLastError();
         if(OrderDelete(t, clrNONE))
           {
            ok = true;
            break;
           }
         err = GetLastError();
         if(!TcMt4Retryable(err))
            break;
         Sleep(20 * (attempt + 1));
        }
      if(!ok && TcMt4Unknown(err) && OrderSelect(t, SELECT_BY_TICKET) && OrderCloseTime() > 0)
         ok = true;
      if(!ok)
         return Fail(err);
      return TcResultTail(true, 0, "cancelled", ticket, 0.0, 0.0, TcUtcNowNs());
     }

   //------------------------------------------------------------ snapshot pieces
   void              WriteAccount(CTcJsonWriter &w)
     {
      w.BeginObject("account");
      w.Str("currency", AccountCurrency());
      w.Num("balance", AccountBalance());
      w.Num("equity", AccountEquity());
      w.Num("margin", AccountMargin());
      w.Num("free_margin", AccountFreeMargin());
      w.Int("leverage", AccountLeverage());
      w.EndObject();
     }
   void              WriteSymbol(CTcJsonWriter &w, const string sym)
     {
      w.BeginItem();
      w.Str("symbol", sym);
      w.Num("contract_size", MarketInfo(sym, MODE_LOTSIZE));
      w.Num("tick_size", MarketInfo(sym, MODE_TICKSIZE));
      w.Num("tick_value", MarketInfo(sym, MODE_TICKVALUE));
      w.Int("digits", (long)MarketInfo(sym, MODE_DIGITS));
      w.Num("volume_min", MarketInfo(sym, MODE_MINLOT));
      w.Num("volume_max", MarketInfo(sym, MODE_MAXLOT));
      w.Num("volume_step", MarketInfo(sym, MODE_LOTSTEP));
      w.Str("trade_mode", MarketInfo(sym, MODE_TRADEALLOWED) > 0 ? "full" : "disabled");
      w.Str("filling", "fok");   // MT4 fills a market order whole or not at all
      w.EndObject();
     }
   void              AddSymbol(string &list[], const string sym)
     {
      if(StringLen(sym) == 0)
         return;
      int n = ArraySize(list);
      for(int i = 0; i < n; i++)
         if(list[i] == sym)
            return;
      if(n >= 500)
         return;
      ArrayResize(list, n + 1);
      list[n] = sym;
     }

   //------------------------------------------------------------ scan -> events
   void              Emit(string &events[], const string tail)
     {
      int n = ArraySize(events);
      ArrayResize(events, n + 1);
      events[n] = tail;
     }

   void              EmitOpened(const int j, string &events[])
     {
      CTcJsonWriter w;
      w.Str("kind", "opened");
      w.Str("ticket", IntegerToString(m_cur.ticket[j]));
      w.Str("symbol", m_cur.sym[j]);
      w.Str("side", TcMt4Side(m_cur.type[j]));
      w.Num("volume", m_cur.lots[j]);
      w.Num("price", m_cur.open[j]);
      w.Level("sl", m_cur.sl[j]);
      w.Level("tp", m_cur.tp[j]);
      w.IntOpt("magic", m_cur.magic[j]);
      w.StrOpt("comment", m_cur.comment[j]);
      w.IntOpt("time", TcServerToUtcNs(m_cur.opened[j]));
      Emit(events, w.Text());
     }

   void              EmitPending(const string kind, const int j, string &events[])
     {
      CTcJsonWriter w;
      w.Str("kind", kind);
      w.Str("ticket", IntegerToString(m_cur.ticket[j]));
      w.Str("symbol", m_cur.sym[j]);
      w.Str("side", TcMt4Side(m_cur.type[j]));
      w.Str("order_type", TcMt4OrderTypeText(m_cur.type[j]));
      w.Num("volume", m_cur.lots[j]);
      w.Num("price", m_cur.open[j]);
      w.Level("sl", m_cur.sl[j]);
      w.Level("tp", m_cur.tp[j]);
      w.IntOpt("expiration", TcServerToUtcNs(m_cur.expiry[j]));
      w.IntOpt("magic", m_cur.magic[j]);
      if(kind == "pending_placed")
         w.StrOpt("comment", m_cur.comment[j]);
      w.Int("time", kind == "pending_placed" ? TcServerToUtcNs(m_cur.opened[j]) : TcUtcNowNs());
      Emit(events, w.Text());
     }

   //--- pending order i (previous scan) became a market order: same ticket in MT4
   void              EmitTriggered(const int i, const int t, const string sym, const int now_type, const double lots,
                                   const double price, const double sl, const double tp, const string comment,
                                   const datetime when, string &events[])
     {
      CTcJsonWriter w;
      w.Str("kind", "pending_triggered");
      w.Str("ticket", IntegerToString(t));
      w.Str("symbol", sym);
      w.Str("side", TcMt4Side(now_type));
      w.Str("order_type", TcMt4OrderTypeText(m_prev.type[i]));
      w.Num("volume", lots);
      w.Num("price", price);
      w.Level("sl", sl);
      w.Level("tp", tp);
      w.IntOpt("magic", m_prev.magic[i]);
      w.StrOpt("comment", comment);
      w.Str("position_ticket", IntegerToString(t));
      w.IntOpt("time", TcServerToUtcNs(when));
      Emit(events, w.Text());
     }

   //--- prev i partially closed; cur j (a new ticket) holds the rest
   void              EmitReduced(const int i, const int j, string &events[])
     {
      double price = 0.0;
      long time_ns = TcUtcNowNs();
      if(OrderSelect(m_prev.ticket[i], SELECT_BY_TICKET) && OrderCloseTime() > 0)
        {
         price = OrderClosePrice();
         time_ns = TcServerToUtcNs(OrderCloseTime());
        }
      double before = m_prev.lots[i];
      double after = m_cur.lots[j];
      CTcJsonWriter w;
      w.Str("kind", "reduced");
      w.Str("ticket", IntegerToString(m_prev.ticket[i]));
      w.Str("symbol", m_prev.sym[i]);
      w.Str("side", TcMt4Side(m_prev.type[i]));
      w.Num("volume", before - after);
      w.Num("volume_before", before);
      w.Num("volume_after", after);
      w.Num("price", price);
      w.IntOpt("magic", m_prev.magic[i]);
      w.Str("new_ticket", IntegerToString(m_cur.ticket[j]));
      w.IntOpt("time", time_ns);
      Emit(events, w.Text());
      //--- the remainder inherits the copy comment (follower side of the mapping)
      string eff = EffectiveComment(m_prev.ticket[i], m_prev.comment[i]);
      if(TcIsCopyComment(eff))
         m_alias.Alias(IntegerToString(m_cur.ticket[j]), eff);
     }

   void              EmitGone(const int i, string &events[])
     {
      int t = m_prev.ticket[i];
      bool hist = OrderSelect(t, SELECT_BY_TICKET) && OrderCloseTime() > 0;
      if(TcMt4IsPending(m_prev.type[i]))
        {
         if(hist && TcMt4IsMarket(OrderType()))
           {
            //--- triggered and closed between two scans: both facts, in order
            int now_type = OrderType();
            double lots = OrderLots(), open_price = OrderOpenPrice(), close_price = OrderClosePrice();
            double sl = OrderStopLoss(), tp = OrderTakeProfit();
            datetime opened = OrderOpenTime(), closed = OrderCloseTime();
            string comment = OrderComment();
            EmitTriggered(i, t, m_prev.sym[i], now_type, lots, open_price, sl, tp, m_prev.comment[i], opened, events);
            CTcJsonWriter c;
            c.Str("kind", "closed");
            c.Str("ticket", IntegerToString(t));
            c.Str("symbol", m_prev.sym[i]);
            c.Str("side", TcMt4Side(now_type));
            c.Num("volume", lots);
            c.Num("price", close_price);
            c.IntOpt("magic", m_prev.magic[i]);
            c.Str("reason", TcMt4CloseReason(comment));
            c.IntOpt("time", TcServerToUtcNs(closed));
            Emit(events, c.Text());
            return;
           }
         string why = "cancelled";
         if(hist && OrderExpiration() > 0 && OrderCloseTime() >= OrderExpiration())
            why = "expired";
         CTcJsonWriter w;
         w.Str("kind", "pending_cancelled");
         w.Str("ticket", IntegerToString(t));
         w.Str("symbol", m_prev.sym[i]);
         w.Str("side", TcMt4Side(m_prev.type[i]));
         w.Str("order_type", TcMt4OrderTypeText(m_prev.type[i]));
         w.Num("volume", m_prev.lots[i]);
         w.Num("price", m_prev.open[i]);
         w.IntOpt("magic", m_prev.magic[i]);
         w.Str("reason", why);
         w.Int("time", hist ? TcServerToUtcNs(OrderCloseTime()) : TcUtcNowNs());
         Emit(events, w.Text());
         return;
        }
      CTcJsonWriter w;
      w.Str("kind", "closed");
      w.Str("ticket", IntegerToString(t));
      w.Str("symbol", m_prev.sym[i]);
      w.Str("side", TcMt4Side(m_prev.type[i]));
      w.Num("volume", m_prev.lots[i]);
      w.NumOpt("price", hist ? OrderClosePrice() : 0.0);
      w.IntOpt("magic", m_prev.magic[i]);
      w.Str("reason", hist ? TcMt4CloseReason(OrderComment()) : "client");
      w.Int("time", hist ? TcServerToUtcNs(OrderCloseTime()) : TcUtcNowNs());
      Emit(events, w.Text());
     }

   //--- prev i closed by `other` ("close hedge by #other"); k = other's index in prev or -1
   void              EmitClosedBy(const int i, const int k, const int other, bool &cnew[], bool &cused[], string &events[])
     {
      double li = m_prev.lots[i];
      double lk = li;
      int type_k = (m_prev.type[i] == OP_BUY) ? OP_SELL : OP_BUY;
      if(k >= 0)
        {
         lk = m_prev.lots[k];
         type_k = m_prev.type[k];
        }
      //--- the bigger one keeps a remainder under a new ticket: it is "ticket" in the event
      bool i_bigger = li >= lk;
      int big = i_bigger ? m_prev.ticket[i] : other;
      int small = i_bigger ? other : m_prev.ticket[i];
      int big_type = i_bigger ? m_prev.type[i] : type_k;
      double rest_lots = MathAbs(li - lk);
      int rest_j = -1;
      if(rest_lots > TC_MT4_EPS)
        {
         for(int j = 0; j < m_cur.n; j++)
           {
            if(!cnew[j] || cused[j] || m_cur.sym[j] != m_prev.sym[i] || m_cur.type[j] != big_type)
               continue;
            if(MathAbs(m_cur.lots[j] - rest_lots) > TC_MT4_EPS)
               continue;
            rest_j = j;
            break;
           }
        }
      double price = 0.0;
      long time_ns = TcUtcNowNs();
      if(OrderSelect(m_prev.ticket[i], SELECT_BY_TICKET) && OrderCloseTime() > 0)
        {
         price = OrderClosePrice();
         time_ns = TcServerToUtcNs(OrderCloseTime());
        }
      CTcJsonWriter w;
      w.Str("kind", "closed_by");
      w.Str("ticket", IntegerToString(big));
      w.Str("opposite_ticket", IntegerToString(small));
      w.Str("symbol", m_prev.sym[i]);
      w.Str("side", TcMt4Side(big_type));
      w.Num("volume", MathMin(li, lk));
      w.NumOpt("price", price);
      w.IntOpt("magic", m_prev.magic[i]);
      if(rest_j >= 0)
        {
         cused[rest_j] = true;
         w.Str("new_ticket", IntegerToString(m_cur.ticket[rest_j]));
         int bi = i_bigger ? i : k;
         if(bi >= 0)
           {
            string eff = EffectiveComment(m_prev.ticket[bi], m_prev.comment[bi]);
            if(TcIsCopyComment(eff))
               m_alias.Alias(IntegerToString(m_cur.ticket[rest_j]), eff);
           }
        }
      w.IntOpt("time", time_ns);
      Emit(events, w.Text());
     }

   //--- tickets in both scans: triggers and modifications
   void              Compare(const int i, const int j, string &events[])
     {
      int pt = m_prev.type[i];
      int ct = m_cur.type[j];
      double point = MarketInfo(m_cur.sym[j], MODE_POINT);
      double tol = (point > 0.0) ? point / 2.0 : TC_MT4_EPS;
      if(TcMt4IsPending(pt) && TcMt4IsMarket(ct))
        {
         EmitTriggered(i, m_cur.ticket[j], m_cur.sym[j], ct, m_cur.lots[j], m_cur.open[j], m_cur.sl[j], m_cur.tp[j],
                       m_cur.comment[j], m_cur.opened[j], events);
         return;
        }
      if(TcMt4IsMarket(pt) && TcMt4IsMarket(ct))
        {
         if(m_cur.lots[j] < m_prev.lots[i] - TC_MT4_EPS)
           {
            //--- same ticket, fewer lots (some bridges/servers do this): reduced without new ticket
            CTcJsonWriter r;
            r.Str("kind", "reduced");
            r.Str("ticket", IntegerToString(m_cur.ticket[j]));
            r.Str("symbol", m_cur.sym[j]);
            r.Str("side", TcMt4Side(ct));
            r.Num("volume", m_prev.lots[i] - m_cur.lots[j]);
            r.Num("volume_before", m_prev.lots[i]);
            r.Num("volume_after", m_cur.lots[j]);
            r.IntOpt("magic", m_cur.magic[j]);
            r.Int("time", TcUtcNowNs());
            Emit(events, r.Text());
           }
         if(MathAbs(m_prev.sl[i] - m_cur.sl[j]) > tol || MathAbs(m_prev.tp[i] - m_cur.tp[j]) > tol)
           {
            CTcJsonWriter w;
            w.Str("kind", "modified");
            w.Str("ticket", IntegerToString(m_cur.ticket[j]));
            w.Str("symbol", m_cur.sym[j]);
            w.Str("side", TcMt4Side(ct));
            w.Level("sl", m_cur.sl[j]);
            w.Level("tp", m_cur.tp[j]);
            w.IntOpt("magic", m_cur.magic[j]);
            w.Int("time", TcUtcNowNs());
            Emit(events, w.Text());
           }
         return;
        }
      if(TcMt4IsPending(pt) && TcMt4IsPending(ct))
        {
         if(MathAbs(m_prev.open[i] - m_cur.open[j]) > tol || MathAbs(m_prev.sl[i] - m_cur.sl[j]) > tol ||
            MathAbs(m_prev.tp[i] - m_cur.tp[j]) > tol || m_prev.expiry[i] != m_cur.expiry[j] ||
            MathAbs(m_prev.lots[i] - m_cur.lots[j]) > TC_MT4_EPS)
            EmitPending("pending_modified", j, events);
        }
     }

   //--- a new market order that is the remainder of a gone one, matched by its attributes
   int               MatchRemainder(const int j, bool &gone[], bool &used[])
     {
      double point = MarketInfo(m_cur.sym[j], MODE_POINT);
      int found = -1;
      int count = 0;
      for(int i = 0; i < m_prev.n; i++)
        {
         if(!gone[i] || used[i] || !TcMt4IsMarket(m_prev.type[i]))
            continue;
         if(m_prev.sym[i] != m_cur.sym[j] || m_prev.type[i] != m_cur.type[j] || m_prev.magic[i] != m_cur.magic[j])
            continue;
         if(MathAbs(m_prev.open[i] - m_cur.open[j]) >= point / 2.0 || m_prev.lots[i] <= m_cur.lots[j] + TC_MT4_EPS)
            continue;
         found = i;
         count++;
        }
      return count == 1 ? found : -1;
     }

   void              Diff(string &events[])
     {
      int pn = m_prev.n, cn = m_cur.n;
      bool gone[], fresh[], pused[], cused[];
      ArrayResize(gone, pn);
      ArrayResize(pused, pn);
      ArrayResize(fresh, cn);
      ArrayResize(cused, cn);
      for(int a = 0; a < pn; a++)
        {
         gone[a] = false;
         pused[a] = false;
        }
      for(int b = 0; b < cn; b++)
        {
         fresh[b] = false;
         cused[b] = false;
        }
      //--- merge the two sorted scans
      int i = 0, j = 0;
      while(i < pn || j < cn)
        {
         if(j >= cn || (i < pn && m_prev.ticket[i] < m_cur.ticket[j]))
           {
            gone[i] = true;
            i++;
           }
         else
            if(i >= pn || m_cur.ticket[j] < m_prev.ticket[i])
              {
               fresh[j] = true;
               j++;
              }
            else
              {
               Compare(i, j, events);
               i++;
               j++;
              }
        }
      //--- close-by: history comment "close hedge by #other"
      for(i = 0; i < pn; i++)
        {
         if(!gone[i] || pused[i] || !TcMt4IsMarket(m_prev.type[i]))
            continue;
         if(!OrderSelect(m_prev.ticket[i], SELECT_BY_TICKET) || OrderCloseTime() == 0)
            continue;
         int other = TcTicketAfter(OrderComment(), "close hedge by #");
         if(other <= 0)
            continue;
         int k = m_prev.Find(other);
         pused[i] = true;
         if(k >= 0)
            pused[k] = true;
         EmitClosedBy(i, k, other, fresh, cused, events);
        }
      //--- partial closes seen from the closed part: history comment "to #new"
      for(i = 0; i < pn; i++)
        {
         if(!gone[i] || pused[i] || !TcMt4IsMarket(m_prev.type[i]))
            continue;
         if(!OrderSelect(m_prev.ticket[i], SELECT_BY_TICKET) || OrderCloseTime() == 0)
            continue;
         int nt = TcTicketAfter(OrderComment(), "to #");
         if(nt <= 0)
            continue;
         int jj = m_cur.Find(nt);
         if(jj < 0 || !fresh[jj] || cused[jj])
            continue;
         pused[i] = true;
         cused[jj] = true;
         EmitReduced(i, jj, events);
        }
      //--- partial closes seen from the remainder: "from #old", or matching attributes
      for(j = 0; j < cn; j++)
        {
         if(!fresh[j] || cused[j] || !TcMt4IsMarket(m_cur.type[j]))
            continue;
         int ii = -1;
         int ot = TcTicketAfter(m_cur.comment[j], "from #");
         if(ot > 0)
           {
            ii = m_prev.Find(ot);
            if(ii >= 0 && (!gone[ii] || pused[ii]))
               ii = -1;
           }
         if(ii < 0)
            ii = MatchRemainder(j, gone, pused);
         if(ii < 0)
            continue;
         pused[ii] = true;
         cused[j] = true;
         EmitReduced(ii, j, events);
        }
      //--- what is left: closes, cancellations, opens, placements
      for(i = 0; i < pn; i++)
         if(gone[i] && !pused[i])
            EmitGone(i, events);
      for(j = 0; j < cn; j++)
        {
         if(!fresh[j] || cused[j])
            continue;
         if(TcMt4IsMarket(m_cur.type[j]))
            EmitOpened(j, events);
         else
            if(TcMt4IsPending(m_cur.type[j]))
               EmitPending("pending_placed", j, events);
        }
     }

public:
                     CTcMt4Terminal() : m_magic(0), m_deviation(20), m_recoverDays(7), m_stopsAfterFill(false), m_scanned(false) {}

   void              Init(const string account, const long magic, const int deviation_points, const string symbols,
                          const int recover_days, const bool stops_after_fill)
     {
      m_magic = magic;
      m_deviation = deviation_points;
      m_symbolsCfg = symbols;
      m_recoverDays = recover_days;
      m_stopsAfterFill = stops_after_fill;
      m_account = account;
      m_alias.Open(account, "aliases", false);
      m_scanned = false;
     }

   //--- re-read the alias file: another program (EA / loop script) may have added to it
   void              ReloadAliases() { m_alias.Open(m_account, "aliases", false); }

   void              Shutdown() { m_alias.Close(); }

   //--- one scan of the trade pool; events only when emit (a non-owner only keeps its baseline)
   void              Scan(string &events[], const bool emit)
     {
      m_cur.Load();
      if(m_scanned && emit)
         Diff(events);
      m_prev.CopyFrom(m_cur);
      m_scanned = true;
     }

   virtual string    Platform() { return "mt4"; }

   virtual string    SnapshotTail(const string corr)
     {
      CTcJsonWriter w;
      w.StrOpt("corr", corr);
      WriteAccount(w);
      string syms[];
      ArrayResize(syms, 0);
      int total = OrdersTotal();
      for(int i = 0; i < total; i++)
         if(OrderSelect(i, SELECT_BY_POS, MODE_TRADES))
            AddSymbol(syms, OrderSymbol());
      if(StringLen(m_symbolsCfg) == 0)
        {
         for(int s = 0; s < SymbolsTotal(true); s++)
            AddSymbol(syms, SymbolName(s, true));
        }
      else
        {
         string cfg[];
         int nc = StringSplit(m_symbolsCfg, ',', cfg);
         for(int c = 0; c < nc; c++)
           {
            string one = StringTrimRight(StringTrimLeft(cfg[c]));
            if(SymbolSelect(one, true))
               AddSymbol(syms, one);
           }
        }
      w.BeginArray("symbols");
      for(int k = 0; k < ArraySize(syms); k++)
         WriteSymbol(w, syms[k]);
      w.EndArray();

      w.BeginArray("positions");
      for(int p = 0; p < total; p++)
        {
         if(!OrderSelect(p, SELECT_BY_POS, MODE_TRADES) || !TcMt4IsMarket(OrderType()))
            continue;
         w.BeginItem();
         w.Str("ticket", IntegerToString(OrderTicket()));
         w.Str("symbol", OrderSymbol());
         w.Str("side", TcMt4Side(OrderType()));
         w.Num("volume", OrderLots());
         w.Num("price", OrderOpenPrice());
         w.Level("sl", OrderStopLoss());
         w.Level("tp", OrderTakeProfit());
         w.IntOpt("magic", OrderMagicNumber());
         int t = OrderTicket();
         datetime opened = OrderOpenTime();
         //--- the copy comment even after a partial close replaced it with "from #..."
         w.StrOpt("comment", EffectiveComment(t, OrderComment()));
         w.IntOpt("time", TcServerToUtcNs(opened));
         w.EndObject();
        }
      w.EndArray();

      w.BeginArray("orders");
      for(int o = 0; o < total; o++)
        {
         if(!OrderSelect(o, SELECT_BY_POS, MODE_TRADES) || !TcMt4IsPending(OrderType()))
            continue;
         w.BeginItem();
         w.Str("ticket", IntegerToString(OrderTicket()));
         w.Str("symbol", OrderSymbol());
         w.Str("order_type", TcMt4OrderTypeText(OrderType()));
         w.Num("volume", OrderLots());
         w.Num("price", OrderOpenPrice());
         w.Level("sl", OrderStopLoss());
         w.Level("tp", OrderTakeProfit());
         w.IntOpt("expiration", TcServerToUtcNs(OrderExpiration()));
         w.IntOpt("magic", OrderMagicNumber());
         w.StrOpt("comment", OrderComment());
         w.EndObject();
        }
      w.EndArray();
      return w.Text();
     }

   virtual string    AccountTail()
     {
      CTcJsonWriter w;
      WriteAccount(w);
      int n = 0;
      for(int i = OrdersTotal() - 1; i >= 0; i--)
         if(OrderSelect(i, SELECT_BY_POS, MODE_TRADES) && TcMt4IsMarket(OrderType()))
            n++;
      w.Int("positions", n);
      return w.Text();
     }

   virtual string    AccountFingerprint()
     {
      return StringFormat("%.2f|%.2f|%.2f|%d", AccountBalance(), AccountEquity(), AccountMargin(), OrdersTotal());
     }

   virtual string    StateHash()
     {
      CTcStateHash h;
      for(int i = OrdersTotal() - 1; i >= 0; i--)
        {
         if(!OrderSelect(i, SELECT_BY_POS, MODE_TRADES))
            continue;
         if(TcMt4IsMarket(OrderType()))
            h.AddPosition(OrderTicket(), OrderLots(), OrderStopLoss(), OrderTakeProfit());
         else
            if(TcMt4IsPending(OrderType()))
               h.AddOrder(OrderTicket(), OrderLots(), OrderStopLoss(), OrderTakeProfit(), OrderOpenPrice());
        }
      return h.Hex();
     }

   virtual string    ResolveTicket(CTcJsonObject &cmd)
     {
      string t = cmd.Str("ticket");
      if(StringLen(t) > 0)
         return t;
      string c = cmd.Str("comment");
      if(!TcIsKeyComment(c))
         return "";
      string op = cmd.Str("op");
      if(op == "close" || op == "modify" || op == "close_by")
         return FindOpenByComment(cmd.Str("symbol"), Magic(cmd), c, true);
      if(op == "pending_modify" || op == "pending_cancel")
         return FindOpenByComment(cmd.Str("symbol"), Magic(cmd), c, false);
      return "";
     }

   virtual double    VolumeOf(const string ticket)
     {
      int t = (int)StringToInteger(ticket);
      if(t > 0 && OrderSelect(t, SELECT_BY_TICKET) && OrderCloseTime() == 0)
         return OrderLots();
      return 0.0;
     }

   virtual string    Execute(CTcJsonObject &cmd)
     {
      if(!IsConnected())
         return TcResultTail(false, 6, TcMt4ErrorText(6), "", 0.0, 0.0, TcUtcNowNs());
      if(!TerminalInfoInteger(TERMINAL_TRADE_ALLOWED) || !MQLInfoInteger(MQL_TRADE_ALLOWED))
         return TcResultTail(false, 4109, TcMt4ErrorText(4109), "", 0.0, 0.0, TcUtcNowNs());
      string op = cmd.Str("op");
      if(op == "open")
         return DoOpen(cmd);
      if(op == "pending_place")
         return DoPendingPlace(cmd);
      string ticket = ResolveTicket(cmd);
      if(StringLen(ticket) == 0)
         return TcRefuseTail("ea: " + op + " needs a ticket (none given, none found by comment)");
      if(op == "close")
         return DoClose(cmd, ticket);
      if(op == "modify")
         return DoModify(cmd, ticket);
      if(op == "close_by")
         return DoCloseBy(cmd, ticket);
      if(op == "pending_modify")
         return DoPendingModify(cmd, ticket);
      if(op == "pending_cancel")
         return DoPendingCancel(ticket);
      return TcRefuseTail("ea: unknown op " + op);
     }

   virtual string    FindCopy(CTcJsonObject &cmd)
     {
      string op = cmd.Str("op");
      string c = cmd.Str("comment");
      if((op != "open" && op != "pending_place") || !TcIsKeyComment(c))
         return "";
      string sym = cmd.Str("symbol");
      long magic = Magic(cmd);
      bool market = (op == "open");
      string t = FindOpenByComment(sym, magic, c, market);
      if(t == "" && !market)
         t = FindOpenByComment(sym, magic, c, true);   // the copied pending order already triggered
      if(t == "")
         t = FindHistoryByComment(sym, magic, c, market);
      if(t == "")
         return "";
      double vol = 0.0, price = 0.0;
      if(OrderSelect((int)StringToInteger(t), SELECT_BY_TICKET))
        {
         vol = OrderLots();
         price = OrderOpenPrice();
        }
      return TcResultTail(true, 0, "ea: already executed, copy #" + t + " found by comment", t, price, vol, TcUtcNowNs());
     }

   virtual string    Recover(CTcJsonObject &cmd, const string ticket, const double volume_before)
     {
      string op = cmd.Str("op");
      if(op == "open" || op == "pending_place")
         return FindCopy(cmd);
      int t = (int)StringToInteger(ticket);
      bool closed = (t > 0 && OrderSelect(t, SELECT_BY_TICKET) && OrderCloseTime() > 0);
      if(op == "close" && closed)
        {
         string rest = "";
         for(int i = OrdersTotal() - 1; i >= 0; i--)
            if(OrderSelect(i, SELECT_BY_POS, MODE_TRADES) && TcTicketAfter(OrderComment(), "from #") == t)
               rest = IntegerToString(OrderTicket());
         return TcResultTail(true, 0, "ea: recovered after restart, position closed", rest != "" ? rest : ticket,
                             0.0, 0.0, TcUtcNowNs());
        }
      if(op == "close_by")
        {
         int o = (int)StringToInteger(cmd.Str("opposite_ticket"));
         bool oclosed = (o > 0 && OrderSelect(o, SELECT_BY_TICKET) && OrderCloseTime() > 0);
         if(closed || oclosed)
            return TcResultTail(true, 0, "ea: recovered after restart, closed by", ticket, 0.0, 0.0, TcUtcNowNs());
        }
      if(op == "pending_cancel" && closed)
         return TcResultTail(true, 0, "ea: recovered after restart, order gone", ticket, 0.0, 0.0, TcUtcNowNs());
      return "";
     }
  };

#endif // TC_MT4_TERMINAL_MQH
//+------------------------------------------------------------------+
